'use strict'
// Live clusters on 127.0.0.1: propagation, event semantics, membership and restarts.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const { Gossiper } = require('..')
const { FAST, startCluster, stopAll, waitFor, waitForEvent, waitRounds, record } = require('./helpers')
const { encodeValue } = require('../values')
const { push, delta, sendRaw } = require('./frames')

const updatesOf = (events, peer) => events.filter(([name, p]) => name === 'update' && p === peer)

test('a value set on one node of three reaches both others as an update, and peerValue/peerKeys agree', async () => {
  const nodes = await startCluster(3)
  try {
    const [seed, b, c] = nodes
    const value = { list: [1, 'two', { three: 3 }], nothing: null, ok: true, ratio: 0.25 }
    const arrivals = [seed, c].map((g) => waitForEvent(g, 'update', (peer, key) => peer === b.peer_name && key === 'config'))
    b.setLocalState('config', value)
    for (const [peer, key, got] of await Promise.all(arrivals)) {
      assert.equal(peer, b.peer_name)
      assert.equal(key, 'config')
      assert.deepEqual(got, value)
    }
    for (const g of [seed, c]) {
      assert.deepEqual(g.peerValue(b.peer_name, 'config'), value)
      assert.deepEqual(g.peerKeys(b.peer_name), ['config'])
    }
    assert.deepEqual(b.getLocalState('config'), value)
  } finally {
    await stopAll(nodes)
  }
})

test("'update' fires exactly once per key version, in version order, on every receiver", async () => {
  const events = new Map()
  const nodes = await startCluster(3, {}, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    const [a, b, c] = nodes
    const keys = ['k1', 'k2', 'k3', 'k4', 'k5']
    keys.forEach((key, i) => a.setLocalState(key, { n: i + 1 }))
    for (const g of [b, c]) {
      await waitFor(() => g.peerValue(a.peer_name, 'k5') !== undefined, 5000, `${g.peer_name} to get k5`)
    }
    // Several more rounds of a's gossip reach both receivers: any duplicate would show by now.
    await Promise.all([waitRounds(b, a.peer_name, 6), waitRounds(c, a.peer_name, 6)])
    const expected = keys.map((key, i) => ['update', a.peer_name, key, { n: i + 1 }])
    assert.deepEqual(updatesOf(events.get(b), a.peer_name), expected)
    assert.deepEqual(updatesOf(events.get(c), a.peer_name), expected)
    assert.deepEqual(b.peerKeys(a.peer_name), keys)

    // Overwriting k2 is a new version of it: exactly one more update, after the others.
    a.setLocalState('k2', 'again')
    for (const g of [b, c]) {
      await waitFor(() => g.peerValue(a.peer_name, 'k2') === 'again', 5000, `${g.peer_name} to get k2 again`)
    }
    await Promise.all([waitRounds(b, a.peer_name, 6), waitRounds(c, a.peer_name, 6)])
    expected.push(['update', a.peer_name, 'k2', 'again'])
    assert.deepEqual(updatesOf(events.get(b), a.peer_name), expected)
    assert.deepEqual(updatesOf(events.get(c), a.peer_name), expected)
    assert.deepEqual(b.peerKeys(a.peer_name), ['k1', 'k3', 'k4', 'k5', 'k2'])
  } finally {
    await stopAll(nodes)
  }
})

test("heartbeats and other bookkeeping never show up as 'update' events", async () => {
  const events = new Map()
  const nodes = await startCluster(3, {}, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    const [a, b, c] = nodes
    // Ten rounds of every node seen by every other, with no write anywhere.
    await Promise.all([
      waitRounds(a, b.peer_name, 10), waitRounds(b, c.peer_name, 10), waitRounds(c, a.peer_name, 10),
    ])
    for (const g of nodes) {
      assert.deepEqual(events.get(g).filter(([name]) => name === 'update'), [], `updates on ${g.peer_name}`)
      for (const peer of g.allPeers()) assert.deepEqual(g.peerKeys(peer), [])
    }
  } finally {
    await stopAll(nodes)
  }
})

test('setting an equal value again sends nothing: no second update, no new version', async () => {
  const [a, b] = await startCluster(2)
  try {
    const updates = []
    b.on('update', (peer, key, value) => updates.push([key, value]))
    a.setLocalState('same', { deep: ['x', 1] })
    await waitForEvent(b, 'update', (peer, key) => key === 'same')

    // An equal value, built afresh, then a different key as a sentinel written after it.
    a.setLocalState('same', { deep: ['x', 1] })
    a.setLocalState('sentinel', 1)
    await waitFor(() => updates.some(([key]) => key === 'sentinel'), 5000, 'the sentinel key to arrive')
    await waitRounds(b, a.peer_name, 5)

    assert.deepEqual(updates, [['same', { deep: ['x', 1] }], ['sentinel', 1]])
    // Only the sentinel took a version: the equal write changed nothing.
    assert.equal(b.peerDetails().find((d) => d.name === a.peer_name).maxVersion, 2)
    assert.deepEqual(b.peerKeys(a.peer_name), ['same', 'sentinel'])
  } finally {
    await stopAll([a, b])
  }
})

test("'new_peer' fires exactly once per peer, for listeners attached right after the constructor", async () => {
  const events = new Map()
  const nodes = await startCluster(4, {}, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    nodes[1].setLocalState('traffic', 1)
    nodes[3].setLocalState('traffic', 2)
    await Promise.all(nodes.slice(1).map((g) => waitRounds(nodes[0], g.peer_name, 8)))
    for (const g of nodes) {
      const others = nodes.filter((o) => o !== g).map((o) => o.peer_name).sort()
      const newPeers = events.get(g).filter(([name]) => name === 'new_peer').map(([, peer]) => peer)
      assert.deepEqual([...newPeers].sort(), others, `new_peer on ${g.peer_name}`)
      assert.deepEqual(events.get(g).filter(([name]) => name === 'peer_alive' || name === 'peer_failed'), [])
    }
  } finally {
    await stopAll(nodes)
  }
})

test('peer lists never include self, and peerValue/peerKeys answer for the own name', async () => {
  const nodes = await startCluster(3)
  try {
    const [a] = nodes
    a.setLocalState('mine', 'yes')
    a.setLocalState('also', [1, 2])
    const check = () => {
      for (const g of nodes) {
        for (const list of [g.allPeers(), g.livePeers(), g.deadPeers(), g.peerDetails().map((d) => d.name)]) {
          assert.ok(!list.includes(g.peer_name), `${g.peer_name} lists itself: ${list}`)
        }
        assert.equal(g.allPeers().length, 2)
      }
    }
    check()
    await waitFor(() => nodes.every((g) => g.peerValue(a.peer_name, 'also') !== undefined), 5000, 'values to spread')
    check()
    await waitRounds(nodes[1], a.peer_name, 5)
    check()
    assert.equal(a.peerValue(a.peer_name, 'mine'), 'yes')
    assert.deepEqual(a.peerValue(a.peer_name, 'also'), [1, 2])
    assert.deepEqual(a.peerKeys(a.peer_name), ['mine', 'also'])
  } finally {
    await stopAll(nodes)
  }
})

test('an unknown peer or key reads as undefined and []', async () => {
  const [a, b] = await startCluster(2)
  try {
    b.setLocalState('known', 1)
    await waitFor(() => a.peerValue(b.peer_name, 'known') === 1, 5000, 'the known key')
    assert.equal(a.peerValue('127.0.0.1:1', 'known'), undefined)
    assert.equal(a.peerValue('not a peer at all', 'known'), undefined)
    assert.equal(a.peerValue(b.peer_name, 'unknown'), undefined)
    assert.equal(a.peerValue(a.peer_name, 'unknown'), undefined)
    assert.equal(a.getLocalState('unknown'), undefined)
    assert.deepEqual(a.peerKeys('127.0.0.1:1'), [])
    assert.deepEqual(a.peerKeys(''), [])
  } finally {
    await stopAll([a, b])
  }
})

test("stop() then start() of a node: others see 'peer_failed' then 'peer_alive', and its values stay readable", async () => {
  const events = new Map()
  const nodes = await startCluster(3, {}, { beforeStart: (g) => events.set(g, record(g)) })
  try {
    const [a, b, c] = nodes
    const name = b.peer_name
    b.setLocalState('kept', { across: 'restarts' })
    await waitFor(() => [a, c].every((g) => g.peerValue(name, 'kept') !== undefined), 5000, 'kept to spread')
    const generation = a.peerDetails().find((d) => d.name === name).generation

    const failed = [a, c].map((g) => waitForEvent(g, 'peer_failed', (peer) => peer === name, 5000))
    await b.stop()
    await Promise.all(failed)
    for (const g of [a, c]) {
      const detail = g.peerDetails().find((d) => d.name === name)
      // Failed by the leave announcement, not by the failure detector.
      assert.equal(detail.left, true)
      assert.equal(detail.live, false)
      assert.deepEqual(g.deadPeers(), [name])
      assert.deepEqual(g.peerValue(name, 'kept'), { across: 'restarts' })
    }
    assert.deepEqual(b.getLocalState('kept'), { across: 'restarts' })

    const alive = [a, c].map((g) => waitForEvent(g, 'peer_alive', (peer) => peer === name, 8000))
    await b.start()
    assert.equal(b.peer_name, name, 'a node started on port 0 keeps its port across a restart')
    await Promise.all(alive)
    await waitFor(() => [a, c].every((g) => g.peerValue(name, 'kept') !== undefined), 5000, 'kept after the restart')
    for (const g of [a, c]) {
      assert.deepEqual(g.peerValue(name, 'kept'), { across: 'restarts' })
      assert.deepEqual(g.peerKeys(name), ['kept'])
      assert.ok(g.livePeers().includes(name))
      const detail = g.peerDetails().find((d) => d.name === name)
      assert.ok(detail.generation > generation, 'the restart runs under a new generation')
      assert.equal(detail.left, false)
      const membership = events.get(g).filter(([kind, peer]) => kind !== 'update' && peer === name).map(([kind]) => kind)
      assert.deepEqual(membership, ['new_peer', 'peer_failed', 'peer_alive'])
    }
  } finally {
    await stopAll(nodes)
  }
})

test('listeners run with this === the gossiper, for every event', async () => {
  const [a] = await startCluster(1)
  const kinds = ['new_peer', 'update', 'peer_failed', 'peer_alive']
  const seen = Object.fromEntries(kinds.map((kind) => [kind, []]))
  for (const kind of kinds) a.on(kind, function () { seen[kind].push(this) })
  const joiner = new Gossiper({ ...FAST, port: 0, seeds: [a.peer_name] })
  try {
    await joiner.start()
    joiner.setLocalState('k', 1)
    await waitFor(() => seen.update.length > 0, 5000, 'an update')
    await joiner.stop()
    await waitFor(() => seen.peer_failed.length > 0, 5000, 'peer_failed')
    await joiner.start()
    await waitFor(() => seen.peer_alive.length > 0, 8000, 'peer_alive')
    for (const kind of kinds) {
      assert.ok(seen[kind].length > 0, kind)
      for (const self of seen[kind]) assert.equal(self, a, `this in '${kind}'`)
    }
  } finally {
    await stopAll([a, joiner])
  }
})

test('a listener that throws does not stop later events from being delivered', async () => {
  const [a, b] = await startCluster(2)
  // node:test reports any uncaught exception as a failure: take its listeners off meanwhile.
  const harness = process.listeners('uncaughtException')
  process.removeAllListeners('uncaughtException')
  const uncaught = []
  const caught = new Promise((resolve) => process.once('uncaughtException', (error) => { uncaught.push(error); resolve(error) }))
  // Anything past the first is collected too, so a second throw cannot kill the runner.
  const more = (error) => uncaught.push(error)
  try {
    const received = []
    b.on('update', (peer, key, value) => received.push([key, value]))
    b.on('update', (peer, key) => {
      if (key === 'bad') throw new Error('listener failure')
    })
    // Written together, so 'good' most likely travels in the same batch right behind 'bad'.
    a.setLocalState('bad', 1)
    a.setLocalState('good', 2)
    const error = await caught
    process.on('uncaughtException', more)
    assert.equal(error.message, 'listener failure')
    await waitFor(() => received.some(([key]) => key === 'good'), 5000, "'good' after the throwing listener")
    a.setLocalState('later', 3)
    await waitFor(() => received.some(([key]) => key === 'later'), 5000, "'later' after the throwing listener")
    assert.deepEqual(received, [['bad', 1], ['good', 2], ['later', 3]])
    assert.equal(uncaught.length, 1)
  } finally {
    process.removeAllListeners('uncaughtException')
    for (const listener of harness) process.on('uncaughtException', listener)
    await stopAll([a, b])
  }
})

test("a peer first learned as already departed gets 'peer_failed' after its 'new_peer'", async () => {
  // What a node sees when a peer's leave announcement is the first it hears of that peer
  // (a node that stops right after joining): one full delta, marked left, pushed by that peer
  // itself. Played here by hand.
  const [a] = await startCluster(1)
  try {
    const events = record(a)
    const departed = '127.0.0.1:7'
    const port = Number(a.peer_name.split(':')[1])
    const goodbye = delta(departed, { left: true, kvs: [['hello', 1, encodeValue('bye')]] })
    await sendRaw(port, push([goodbye], [], { from: departed }))
    await waitFor(() => a.peerValue(departed, 'hello') === 'bye', 5000, 'the departed peer\'s value')
    await waitFor(() => events.length >= 3, 2000, () => `three events, got ${JSON.stringify(events)}`).catch(() => {})
    assert.deepEqual(a.livePeers(), [])
    assert.deepEqual(a.deadPeers(), [departed])
    // Whoever tracks membership by events must not be left believing the peer is alive.
    assert.deepEqual(events, [['new_peer', departed], ['update', departed, 'hello', 'bye'], ['peer_failed', departed]])
  } finally {
    await stopAll([a])
  }
})
