'use strict'
// s2: a seed and 100 peers. One peer is stopped at 5 s and started again 30 s later.
// The seed prints peer_failed / peer_alive for it; every other node's view is counted, and the
// script exits once all 100 others saw it fail and then come back.
// Run: node simulations/s2.js   (GOSSIP_BASE_PORT, default 9000: seed; peers from base + 1)

const Gossiper = require('../').Gossiper

const base = Number(process.env.GOSSIP_BASE_PORT || 9000)
const seedAddress = `127.0.0.1:${base}`
const PEERS = 100
const STOP_AT = 5000
const DOWN_FOR = 30000

const all = [new Gossiper(base, [])]
for (let i = 1; i <= PEERS; i++) all.push(new Gossiper(base + i, [seedAddress]))
const seed = all[0]
const victim = all[PEERS / 2]
const others = all.filter((g) => g !== victim)

const startedAt = Date.now()
const ms = () => Date.now() - startedAt
let stoppedAt, restartedAt
const failedAfter = [] // ms from stop to each observer's peer_failed
const aliveAfter = [] // ms from restart to each observer's peer_alive
const failedSeen = new Set()
const aliveSeen = new Set()
let otherFailures = 0
let done = false

for (const g of others) {
  g.on('peer_failed', function (peer) {
    if (done) return
    if (peer !== victim.peer_name) return otherFailures++
    if (this === seed) console.log(`${ms()} ms: seed sees peer_failed ${peer}`)
    if (!failedSeen.has(this)) failedAfter.push(Date.now() - stoppedAt)
    failedSeen.add(this)
    if (failedSeen.size === others.length) console.log(`${ms()} ms: all ${others.length} others saw peer_failed ${peer}`)
  })
  g.on('peer_alive', function (peer) {
    if (done || peer !== victim.peer_name || !failedSeen.has(this) || aliveSeen.has(this)) return
    if (this === seed) console.log(`${ms()} ms: seed sees peer_alive ${peer}`)
    aliveAfter.push(Date.now() - restartedAt)
    aliveSeen.add(this)
    if (aliveSeen.size === others.length) finish()
  })
}
for (const g of all) g.start()

setTimeout(async function () {
  console.log(`${ms()} ms: stopping ${victim.peer_name}`)
  stoppedAt = Date.now()
  await victim.stop()
  setTimeout(async function () {
    console.log(`${ms()} ms: starting ${victim.peer_name} again`)
    restartedAt = Date.now()
    await victim.start()
  }, DOWN_FOR)
}, STOP_AT)

const safety = setTimeout(function () {
  console.error(`FAILED after 90 s: ${failedSeen.size} of ${others.length} saw peer_failed, ${aliveSeen.size} saw peer_alive again`)
  process.exit(1)
}, 90000)

// first / median / last observer
function spread(times) {
  const t = times.slice().sort((a, b) => a - b)
  return `${t[0]} / ${t[t.length >> 1]} / ${t[t.length - 1]} ms`
}

function finish() {
  done = true
  console.log(`${ms()} ms: all ${others.length} others saw peer_alive ${victim.peer_name}`)
  console.log(`peer_failed after stop (first / median / last observer): ${spread(failedAfter)}`)
  console.log(`peer_alive after restart (first / median / last observer): ${spread(aliveAfter)}`)
  console.log(`peer_failed for any other peer: ${otherFailures}`)
  clearTimeout(safety)
  Promise.all(all.map((g) => g.stop()))
}
