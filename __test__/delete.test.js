'use strict'
// Deleting and expiring keys on live clusters on 127.0.0.1: 'delete' events, TTL expiry, and a
// node away for longer than tombstoneTtl coming back without the keys deleted meanwhile.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const { startCluster, stopAll, waitFor, waitForMembership, waitRounds, record } = require('./helpers')

/** The 'update' and 'delete' events about `peer`'s keys, as [name, key, value?]. */
const keyEvents = (events, peer) => events
  .filter(([name, p]) => (name === 'update' || name === 'delete') && p === peer)
  .map(([name, , ...rest]) => [name, ...rest])

test("a deletion reaches every node once as 'delete', never as 'update', and not the owner", async () => {
  const events = new Map()
  const nodes = await startCluster(3, {}, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    const [a, b, c] = nodes
    a.setLocalState('x', 1)
    a.setLocalState('y', 2)
    for (const g of [b, c]) await waitFor(() => g.peerValue(a.peer_name, 'y') === 2, 5000, `${g.peer_name} to get y`)

    assert.equal(a.deleteLocalState('x'), true)
    assert.equal(a.deleteLocalState('x'), false, 'already deleted')
    assert.equal(a.getLocalState('x'), undefined)
    assert.deepEqual(a.peerKeys(a.peer_name), ['y'])
    for (const g of [b, c]) {
      await waitFor(() => g.peerValue(a.peer_name, 'x') === undefined, 5000, `${g.peer_name} to lose x`)
    }
    // Several more rounds of a's gossip reach both: any duplicate or late update would show.
    await Promise.all([waitRounds(b, a.peer_name, 6), waitRounds(c, a.peer_name, 6)])
    for (const g of [b, c]) {
      assert.deepEqual(g.peerKeys(a.peer_name), ['y'])
      assert.deepEqual(keyEvents(events.get(g), a.peer_name), [['update', 'x', 1], ['update', 'y', 2], ['delete', 'x']])
    }
    assert.deepEqual(events.get(a).filter(([name]) => name === 'delete'), [], 'no event for a local deletion')

    // Written again, the key is back everywhere, as an update.
    a.setLocalState('x', 3)
    for (const g of [b, c]) {
      // Events reach JavaScript a moment after the state has changed: wait for the event.
      await waitFor(() => keyEvents(events.get(g), a.peer_name).length === 4, 5000, `${g.peer_name} to get x again`)
      assert.deepEqual(keyEvents(events.get(g), a.peer_name)[3], ['update', 'x', 3])
      assert.deepEqual(g.peerKeys(a.peer_name), ['y', 'x'])
    }
  } finally {
    await stopAll(nodes)
  }
})

test("'delete' and 'update' of one peer arrive in the order they were made", async () => {
  const events = new Map()
  const nodes = await startCluster(2, {}, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    const [a, b] = nodes
    a.setLocalState('x', 1)
    a.setLocalState('y', 2)
    await waitFor(() => b.peerValue(a.peer_name, 'y') === 2, 5000, 'b to get y')
    a.deleteLocalState('x')
    a.setLocalState('z', 3)
    a.deleteLocalState('y')
    a.setLocalState('w', 4)
    await waitFor(() => b.peerValue(a.peer_name, 'w') === 4, 5000, 'b to get w')
    await waitRounds(b, a.peer_name, 4)
    assert.deepEqual(keyEvents(events.get(b), a.peer_name).slice(2),
      [['delete', 'x'], ['update', 'z', 3], ['delete', 'y'], ['update', 'w', 4]])
    assert.deepEqual(b.peerKeys(a.peer_name), ['z', 'w'])
  } finally {
    await stopAll(nodes)
  }
})

test('a key set with a ttl is gone on every node, the owner included, soon after it expires', async () => {
  const events = new Map()
  const nodes = await startCluster(3, {}, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    const [a, b, c] = nodes
    // Written with a ttl, then again without: it must outlive the lease.
    a.setLocalState('kept', 'old', { ttl: 200 })
    a.setLocalState('kept', 'new')
    a.setLocalState('lease', 'mine', { ttl: 300 })
    for (const g of [b, c]) await waitFor(() => g.peerValue(a.peer_name, 'lease') === 'mine', 5000, `${g.peer_name} to get the lease`)
    await waitFor(() => nodes.every((g) => g.peerValue(a.peer_name, 'lease') === undefined), 5000,
      () => 'the lease to expire everywhere: ' + nodes.map((g) => `${g.peer_name} has [${g.peerKeys(a.peer_name)}]`).join('; '))
    assert.equal(a.getLocalState('lease'), undefined)
    await Promise.all([waitRounds(b, a.peer_name, 4), waitRounds(c, a.peer_name, 4)])
    for (const g of nodes) assert.deepEqual(g.peerKeys(a.peer_name), ['kept'])
    for (const g of [b, c]) {
      assert.deepEqual(keyEvents(events.get(g), a.peer_name).filter(([, key]) => key === 'lease'),
        [['update', 'lease', 'mine'], ['delete', 'lease']])
    }
  } finally {
    await stopAll(nodes)
  }
})

test('a node stopped for longer than tombstoneTtl comes back without the deleted key; nobody gets it back', async () => {
  const events = new Map()
  const nodes = await startCluster(3, { tombstoneTtl: 300 }, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    const [a, b, c] = nodes
    a.setLocalState('x', 1)
    a.setLocalState('y', 2)
    for (const g of [b, c]) await waitFor(() => g.peerKeys(a.peer_name).length === 2, 5000, `${g.peer_name} to get x and y`)
    await c.stop()

    a.deleteLocalState('x')
    await waitFor(() => b.peerValue(a.peer_name, 'x') === undefined, 5000, 'b to lose x')
    // Once b has learned that a forgot the deletion, only a replacement of c's view can work.
    const horizon = () => b.peerDetails().find((d) => d.name === a.peer_name)?.horizon ?? 0
    await waitFor(() => horizon() > 0, 5000, 'a to collect the tombstone and b to learn it')
    assert.deepEqual(c.peerKeys(a.peer_name), ['x', 'y'], 'c heard nothing meanwhile')
    const cBefore = events.get(c).length

    await c.start()
    await waitForMembership(nodes)
    await waitFor(() => c.peerValue(a.peer_name, 'x') === undefined, 5000, 'c to lose x')
    await Promise.all([waitRounds(c, a.peer_name, 6), waitRounds(b, c.peer_name, 6), waitRounds(a, c.peer_name, 6)])
    for (const g of nodes) assert.deepEqual(g.peerKeys(a.peer_name), ['y'], `${g.peer_name}'s view of a`)
    assert.deepEqual(keyEvents(events.get(c).slice(cBefore), a.peer_name), [['delete', 'x']])
    assert.deepEqual(keyEvents(events.get(b), a.peer_name), [['update', 'x', 1], ['update', 'y', 2], ['delete', 'x']])
  } finally {
    await stopAll(nodes)
  }
})
