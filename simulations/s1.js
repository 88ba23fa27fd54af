'use strict'
// s1: a seed, 100 peers and one updater. After 10 s the updater sets `hi`;
// prints how long until all 100 peers got it, then stops everything and exits.
// Run: node simulations/s1.js   (GOSSIP_BASE_PORT, default 9000: seed, peers and updater follow it)

const Gossiper = require('../').Gossiper

const base = Number(process.env.GOSSIP_BASE_PORT || 9000)
const seedAddress = `127.0.0.1:${base}`
const PEERS = 100

const seed = new Gossiper(base, [])
seed.start()
const all = [seed]

const got = new Set()
let writtenAt
for (let i = 1; i <= PEERS; i++) {
  const g = new Gossiper(base + i, [seedAddress])
  g.start()
  g.on('update', function (peer, k, v) {
    if (k !== 'hi' || got.has(this.peer_name)) return
    got.add(this.peer_name)
    if (got.size % 25 === 0) console.log(`${got.size} peers have hi=${v} after ${Date.now() - writtenAt} ms`)
    if (got.size === PEERS) finish()
  })
  all.push(g)
}

const updater = new Gossiper(base + PEERS + 1, [seedAddress])
updater.start()
all.push(updater)
setTimeout(function () {
  console.log(`${updater.peer_name} knows ${updater.livePeers().length} live peers; setting hi`)
  writtenAt = Date.now()
  updater.setLocalState('hi', 'hello')
}, 10000)

const safety = setTimeout(function () {
  console.error(`FAILED: only ${got.size} of ${PEERS} peers got hi within 60 s`)
  process.exit(1)
}, 60000)

function finish() {
  console.log(`all ${PEERS} peers got hi in ${Date.now() - writtenAt} ms`)
  clearTimeout(safety)
  Promise.all(all.map((g) => g.stop()))
}
