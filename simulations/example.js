'use strict'
// The README example: a seed, 20 peers pointed at it, and one more peer that sets a key.
// Every peer logs the update; the script exits once all 20 have it.
// Run: node simulations/example.js   (GOSSIP_BASE_PORT moves 9000-9020 and 9999 together)

const Gossiper = require('../').Gossiper

const base = Number(process.env.GOSSIP_BASE_PORT || 9000)
const seedAddress = `127.0.0.1:${base}`
const PEERS = 20

// Create a seed peer.
const seed = new Gossiper(base, [])
seed.start()
const all = [seed]

// Create 20 new peers and point them at the seed (usually this would happen in 20 separate processes).
const got = new Set()
let writtenAt
for (let i = 1; i <= PEERS; i++) {
  const g = new Gossiper(base + i, [seedAddress])
  g.start()
  g.on('update', function (peer, k, v) {
    console.log('peer ' + peer + ' set ' + k + ' to ' + v + '  (seen by ' + this.peer_name + ')')
    if (k !== 'somekey' || got.has(this.peer_name)) return
    got.add(this.peer_name)
    if (got.size === PEERS) finish(peer)
  })
  all.push(g)
}

// Add another peer which updates its state once the membership has formed.
// (The original waited 15 s; 3 s is plenty here.)
const updater = new Gossiper(base + 999, [seedAddress])
updater.start()
all.push(updater)
setTimeout(function () {
  writtenAt = Date.now()
  updater.setLocalState('somekey', 'somevalue')
}, 3000)

const safety = setTimeout(function () {
  console.error(`FAILED: only ${got.size} of ${PEERS} peers got somekey within 60 s`)
  process.exit(1)
}, 60000)

function finish(peer) {
  console.log(`all ${PEERS} peers got somekey from ${peer} in ${Date.now() - writtenAt} ms`)
  clearTimeout(safety)
  Promise.all(all.map((g) => g.stop()))
}
