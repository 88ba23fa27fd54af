'use strict'
// s3: two seeds and 101 peers. Exits once every node has seen new_peer for all the others.
// Run: node simulations/s3.js   (GOSSIP_BASE_PORT, default 9000: seeds on base and base + 1, peers after)

const Gossiper = require('../').Gossiper

const base = Number(process.env.GOSSIP_BASE_PORT || 9000)
const seeds = [`127.0.0.1:${base}`, `127.0.0.1:${base + 1}`]
const PEERS = 101

const all = [new Gossiper(base, [seeds[1]]), new Gossiper(base + 1, [seeds[0]])]
for (let i = 2; i < PEERS + 2; i++) all.push(new Gossiper(base + i, seeds))

const startedAt = Date.now()
const known = new Map(all.map((g) => [g, new Set()]))
let complete = 0

for (const g of all) {
  g.on('new_peer', function (peer) {
    const seen = known.get(this)
    seen.add(peer)
    if (seen.size !== all.length - 1) return
    complete++
    if (complete % 25 === 0) console.log(`${complete} nodes know all ${all.length - 1} others after ${Date.now() - startedAt} ms`)
    if (complete === all.length) finish()
  })
  g.start()
}

const safety = setTimeout(function () {
  console.error(`FAILED: only ${complete} of ${all.length} nodes know every other node after 60 s`)
  process.exit(1)
}, 60000)

function finish() {
  console.log(`all ${all.length} nodes saw new_peer for every other node in ${Date.now() - startedAt} ms`)
  clearTimeout(safety)
  Promise.all(all.map((g) => g.stop()))
}
