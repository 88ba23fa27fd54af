'use strict'
// Bounded resources over real sockets: slow connections on every slot, partial frames past the
// process budget, forged names, and the per-node key limit. Small limits and fast rounds keep it
// quick; every wait is bounded and none asserts a timing.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { Gossiper } = require('..')
const { FAST, startCluster, stopAll, waitFor, waitForEvent, record } = require('./helpers')
const { frame, PUSH, sendRaw } = require('./frames')

const portOf = (g) => Number(g.peer_name.split(':')[1])

/** Resolves once `writer`'s key has reached every other node. */
function spreads(nodes, writer, key) {
  const arrivals = nodes.filter((g) => g !== writer)
    .map((g) => waitForEvent(g, 'update', (peer, k) => peer === writer.peer_name && k === key, 5000))
  writer.setLocalState(key, { from: writer.peer_name })
  return Promise.all(arrivals)
}

test('slow connections holding every slot of every node cause no false failure', async () => {
  const nodes = await startCluster(3, { maxInboundConnections: 16, idleTimeout: 1000 })
  const falseFailures = []
  for (const g of nodes) g.on('peer_failed', (peer) => falseFailures.push([g.peer_name, peer]))
  const sockets = new Set()
  let flooding = true
  // Twice as many connections as each node has slots, each trickling a byte every 100 ms, and
  // reopened as soon as the node closes it.
  const open = (port) => {
    if (!flooding) return
    const socket = net.connect(port, '127.0.0.1')
    const trickle = setInterval(() => socket.write(Buffer.from([0])), 100)
    sockets.add(socket)
    socket.on('error', () => {})
    socket.on('close', () => {
      clearInterval(trickle)
      sockets.delete(socket)
      setImmediate(() => open(port))
    })
  }
  try {
    for (const g of nodes) for (let i = 0; i < 32; i++) open(portOf(g))
    // About 60 gossip rounds, three times the silence that convicts a peer.
    for (let round = 0; round < 6; round++) {
      await spreads(nodes, nodes[round % 3], `during${round}`)
      await new Promise((resolve) => setTimeout(resolve, 500))
    }
    assert.deepEqual(falseFailures, [])
    for (const g of nodes) {
      const { rejected } = g.stats()
      assert.ok(rejected.sourceLimit + rejected.inboundFull + rejected.timedOut > 0, JSON.stringify(rejected))
    }
  } finally {
    flooding = false
    for (const socket of sockets) socket.destroy()
    await stopAll(nodes)
  }
})

test('partial frames past the process-wide budget are dropped, oldest first', async () => {
  const nodes = await startCluster(2)
  const sockets = []
  try {
    const victim = nodes[0]
    const size = 4 << 20
    const prefix = Buffer.alloc(4)
    prefix.writeUInt32BE(size)
    const body = Buffer.alloc(size - 1)
    // 24 frames of 4 MiB less a byte: 96 MiB, over the 64 MiB budget.
    for (let i = 0; i < 24; i++) {
      const socket = net.connect(portOf(victim), '127.0.0.1', () => { socket.write(prefix); socket.write(body) })
      socket.on('error', () => {})
      sockets.push(socket)
    }
    await waitFor(() => victim.stats().rejected.frameBudget > 0, 10000,
      () => `a partial frame to be dropped; ${JSON.stringify(victim.stats().rejected)}`)
    await spreads(nodes, victim, 'still')
  } finally {
    for (const socket of sockets) socket.destroy()
    await stopAll(nodes)
  }
})

/** A Push of `count` keyless deltas for names no node has, at `heartbeat`. */
function fakeNames(count, heartbeat) {
  const deltas = []
  for (let i = 0; i < count; i++) deltas.push([`127.66.${i >> 8}.${i & 255}:7000`, 1, heartbeat, 0, 0, false, []])
  return frame(PUSH, [deltas, []])
}

test('forged names: heard of only, they are not peers; over maxPeers they are refused', async () => {
  const nodes = await startCluster(3, { maxPeers: 100 })
  try {
    const victim = nodes[0]
    const events = record(victim)
    await sendRaw(portOf(victim), fakeNames(500, 1))
    await waitFor(() => victim.stats().rejected.tooManyPeers >= 400, 5000,
      () => `names past maxPeers to be refused; ${JSON.stringify(victim.stats().rejected)}`)
    assert.equal(victim.allPeers().length, 2, 'names heard of second-hand are not peers')
    assert.deepEqual(events.filter(([name]) => name === 'new_peer'), [])
    await spreads(nodes, victim, 'after')
  } finally {
    await stopAll(nodes)
  }
})

test('a write past maxKeysPerPeer throws a RangeError naming the option', () => {
  const g = new Gossiper({ ...FAST, maxKeysPerPeer: 3 })
  for (const key of ['a', 'b', 'c']) g.setLocalState(key, 1)
  g.setLocalState('a', 2)
  assert.throws(() => g.setLocalState('d', 1), (error) =>
    error instanceof RangeError && error.code === 'ERR_OUT_OF_RANGE' && /maxKeysPerPeer/.test(error.message))
  assert.equal(g.getLocalState('d'), undefined)
  const small = new Gossiper({ ...FAST, maxBytesPerPeer: 2048, maxValueBytes: 512, maxKeyBytes: 16 })
  for (let i = 0; i < 4; i++) small.setLocalState(`k${i}`, Buffer.alloc(450))
  assert.throws(() => small.setLocalState('k4', Buffer.alloc(450)), (error) =>
    error instanceof RangeError && error.code === 'ERR_OUT_OF_RANGE' && /maxBytesPerPeer/.test(error.message))
  assert.equal(small.getLocalState('k4'), undefined)
})
