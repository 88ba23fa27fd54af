'use strict'
// Keys: sealed frames, the keyring API, rotation while gossiping, outsiders, replays and
// forged frames against keyed nodes, and turning encryption on in a running cluster.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const util = require('node:util')
const { Gossiper } = require('..')
const { encodeValue } = require('../values')
const { FAST, startCluster, stopAll, waitFor, waitForEvent, waitForMembership, waitRounds, record } = require('./helpers')
const { SYN, frame, push, suspect, delta, uint64, sendRaw, seal, recipientTag } = require('./frames')

const newKey = () => crypto.randomBytes(32)
const b64 = (key) => key.toString('base64')

/** Every way a key could show as text. */
const spellings = (key) => [b64(key), key.toString('hex'), key.toString('base64url'), [...key].join(', ')]

function assertNoKeyIn(text, keys, what) {
  for (const key of keys) {
    for (const spelling of spellings(key)) assert.ok(!text.includes(spelling), `${what} shows a key`)
  }
}

const failedEvents = (events) => events.filter(([name]) => name === 'peer_failed')

test('keys option: a Buffer or base64 text of 32 bytes; anything else throws without showing it', () => {
  const key = newKey()
  const bad = [
    [{ keys: b64(key) }, TypeError, 'ERR_INVALID_ARG_TYPE', /"keys"/],
    [{ keys: [] }, TypeError, 'ERR_INVALID_ARG_VALUE', /"keys"/],
    [{ keys: [42] }, TypeError, 'ERR_INVALID_ARG_TYPE', /"keys\[0\]"/],
    [{ keys: [key, null] }, TypeError, 'ERR_INVALID_ARG_TYPE', /"keys\[1\]"/],
    [{ keys: [key.subarray(0, 16)] }, RangeError, 'ERR_CRYPTO_INVALID_KEYLEN', /"keys\[0\]".*32 bytes.*16/],
    [{ keys: [Buffer.concat([key, key])] }, RangeError, 'ERR_CRYPTO_INVALID_KEYLEN', /64 bytes/],
    [{ keys: [b64(key.subarray(0, 31))] }, RangeError, 'ERR_CRYPTO_INVALID_KEYLEN', /31 bytes/],
    [{ keys: [key.toString('hex')] }, RangeError, 'ERR_CRYPTO_INVALID_KEYLEN', /48 bytes/], // hex digits are base64 too
    [{ keys: [b64(key).slice(0, -1)] }, TypeError, 'ERR_INVALID_ARG_VALUE', /not base64/],
    [{ keys: [b64(key) + '\n'] }, TypeError, 'ERR_INVALID_ARG_VALUE', /not base64/],
    [{ acceptPlaintext: true }, TypeError, 'ERR_INVALID_ARG_VALUE', /"acceptPlaintext".*"keys"/],
    [{ keys: [key], acceptPlaintext: 'yes' }, TypeError, 'ERR_INVALID_ARG_TYPE', /"acceptPlaintext"/],
    [{ keys: [key], maxClockSkew: 10 }, RangeError, 'ERR_OUT_OF_RANGE', /"maxClockSkew"/],
  ]
  for (const [options, type, code, message] of bad) {
    let thrown
    assert.throws(() => new Gossiper(options), (error) => { thrown = error; return true })
    assert.ok(thrown instanceof type, `${util.inspect(options)}: ${thrown}`)
    assert.equal(thrown.code, code, thrown.message)
    assert.match(thrown.message, message)
    assertNoKeyIn(thrown.message + thrown.stack, [key], 'an error')
  }
  // Every accepted form, repeats ignored.
  const other = newKey()
  const g = new Gossiper({ keys: [b64(key), new Uint8Array(other), key] })
  assert.deepEqual(g.listKeys(), [b64(key), b64(other)])
})

test('keys never show in util.inspect, options, peerDetails or JSON; listKeys gives them, primary first', async () => {
  const [k1, k2, k3] = [newKey(), newKey(), newKey()]
  const nodes = await startCluster(2, { keys: [k1, k2] })
  try {
    const [g] = nodes
    g.installKey(k3)
    assert.deepEqual(g.options.keys, ['[redacted]', '[redacted]'])
    for (const [what, text] of [
      ['util.inspect', util.inspect(g, { depth: Infinity, showHidden: true })],
      ['options', JSON.stringify(g.options)],
      ['peerDetails', JSON.stringify(g.peerDetails())],
      ['stats', JSON.stringify(g.stats())],
    ]) assertNoKeyIn(text, [k1, k2, k3], what)
    assert.deepEqual(g.listKeys(), [b64(k1), b64(k2), b64(k3)])
  } finally {
    await stopAll(nodes)
  }
})

test('installKey, useKey, removeKey: the primary cannot be removed; a gossiper without keys has none', () => {
  const [k1, k2, k3] = [newKey(), newKey(), newKey()]
  const g = new Gossiper({ keys: [k1] })
  assert.equal(g.installKey(b64(k2)), true)
  assert.equal(g.installKey(k2), false, 'installed already')
  assert.throws(() => g.useKey(k3), { name: 'Error', code: 'ERR_GOSSIP_UNKNOWN_KEY' })
  assert.throws(() => g.removeKey(k1), { name: 'Error', code: 'ERR_GOSSIP_PRIMARY_KEY' })
  g.useKey(k2)
  assert.deepEqual(g.listKeys(), [b64(k2), b64(k1)])
  assert.equal(g.removeKey(k1), true)
  assert.equal(g.removeKey(k1), false, 'not installed')
  assert.deepEqual(g.listKeys(), [b64(k2)])
  assert.throws(() => g.removeKey(k2), { code: 'ERR_GOSSIP_PRIMARY_KEY' })
  assert.throws(() => g.installKey('short'), { name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE' })
  assert.throws(() => g.useKey(Buffer.alloc(8)), { name: 'RangeError', code: 'ERR_CRYPTO_INVALID_KEYLEN', message: /"key"/ })
  assert.throws(() => g.removeKey(undefined), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' })

  const plain = new Gossiper()
  assert.deepEqual(plain.listKeys(), [])
  assert.equal(plain.options.keys, undefined)
  for (const call of [() => plain.installKey(k1), () => plain.useKey(k1), () => plain.removeKey(k1)]) {
    assert.throws(call, { code: 'ERR_GOSSIP_NO_KEYS' })
  }
})

test('a keyed cluster gossips; outsiders without the key or with another never get in, read or write', async () => {
  const key = newKey()
  const nodes = await startCluster(3, { keys: [key] })
  const seedName = nodes[0].peer_name
  const plain = new Gossiper({ ...FAST, port: 0, seeds: [seedName] })
  const stranger = new Gossiper({ ...FAST, port: 0, seeds: [seedName], keys: [newKey()] })
  const outsiders = [plain, stranger]
  try {
    const events = nodes.map(record)
    await Promise.all(outsiders.map((g) => g.start()))
    for (const g of outsiders) g.setLocalState('intrusion', 'yes')
    const arrivals = nodes.slice(1).map((g) => waitForEvent(g, 'update', (peer, k) => k === 'secret'))
    nodes[0].setLocalState('secret', 'for members only')
    await Promise.all(arrivals)

    // Each outsider has knocked on the seed many times by now, and each time been refused.
    await waitFor(() => nodes[0].stats().rejected.plaintext >= 5 && nodes[0].stats().rejected.unknownKey >= 5,
      10000, () => `the seed to refuse both outsiders; ${JSON.stringify(nodes[0].stats().rejected)}`)
    const reply = await sendRaw(Number(seedName.split(':')[1]), frame(SYN, [[]]))
    assert.equal(reply.length, 0, 'a plaintext digest gets no answer')

    const outsiderNames = outsiders.map((g) => g.peer_name)
    for (const g of nodes) {
      assert.deepEqual(g.allPeers(), nodes.filter((o) => o !== g).map((o) => o.peer_name).sort())
      for (const name of outsiderNames) assert.equal(g.peerValue(name, 'intrusion'), undefined)
    }
    for (const g of outsiders) {
      assert.deepEqual(g.allPeers(), [], `${g.peer_name} learned members`)
      assert.equal(g.peerValue(seedName, 'secret'), undefined)
      assert.equal(g.stats().exchanges, 0)
    }
    for (const list of events) {
      assert.deepEqual(list.filter(([, peer]) => outsiderNames.includes(peer)), [])
    }
  } finally {
    await stopAll([...outsiders, ...nodes])
  }
})

test('with keys, plaintext forged frames have no effect: writes, 2^53 counters, left, suspicions, fake and stopped nodes', async () => {
  const key = newKey()
  const nodes = await startCluster(3, { keys: [key] })
  try {
    const [victim, a, b] = nodes
    const port = Number(victim.peer_name.split(':')[1])
    a.setLocalState('k', 'real')
    await waitFor(() => victim.peerValue(a.peer_name, 'k') === 'real', 5000, 'the real value')
    // Its departure is an event of its own: wait for that event, not only for the state.
    const departed = waitForEvent(victim, 'peer_failed', (peer) => peer === b.peer_name)
    await b.stop()
    await departed
    const events = record(victim)
    const before = victim.peerDetails().map(({ phi, heartbeat, ...rest }) => rest)
    const generationOf = (name) => victim.peerDetails().find((d) => d.name === name).generation
    const max = uint64(2n ** 53n)
    const forged = [
      push([delta(a.peer_name, { generation: generationOf(a.peer_name), kvs: [['k', 1000, encodeValue('forged')]] })]),
      push([[a.peer_name, max, 1, 0, 1, false, [['k', 1, encodeValue('forged')]]]]),
      push([[a.peer_name, generationOf(a.peer_name), max, 0, 0, false, []]]),
      push([[a.peer_name, generationOf(a.peer_name), 1, 0, max, false, [['k', max, encodeValue('forged')]]]]),
      push([delta(a.peer_name, { generation: generationOf(a.peer_name), left: true, kvs: [] })]),
      push([delta('127.0.0.1:1'), delta('127.0.0.1:2')]),
      push([delta(b.peer_name, { generation: generationOf(b.peer_name) + 1, heartbeat: 50 })]),
      frame(SYN, [[[b.peer_name, generationOf(b.peer_name) + 1, 99, 0]]]),
      ...Array.from({ length: 50 }, (_, i) => suspect(i % 2 ? a.peer_name : victim.peer_name, generationOf(a.peer_name), 1e6)),
    ]
    const refusedBefore = victim.stats().rejected.plaintext
    for (const bytes of forged) {
      assert.equal((await sendRaw(port, bytes)).length, 0, 'a forged frame gets no answer')
    }
    await waitFor(() => victim.stats().rejected.plaintext === refusedBefore + forged.length, 5000,
      () => `every forged frame to be refused as plaintext; ${JSON.stringify(victim.stats().rejected)}`)
    await waitRounds(victim, a.peer_name, 10)
    assert.deepEqual(victim.peerDetails().map(({ phi, heartbeat, ...rest }) => rest), before)
    assert.equal(victim.peerValue(a.peer_name, 'k'), 'real')
    assert.deepEqual(victim.livePeers(), [a.peer_name])
    assert.deepEqual(events, [])
  } finally {
    await stopAll(nodes)
  }
})

test('a sealed frame (written from the protocol doc) is taken once; a replay, stale, misaddressed or foreign one is refused', async () => {
  const key = newKey()
  const nodes = await startCluster(2, { keys: [key], maxClockSkew: 30000 })
  try {
    const [victim] = nodes
    const port = Number(victim.peer_name.split(':')[1])
    const rejected = () => victim.stats().rejected
    const insider = '127.0.0.1:7'
    // The insider's node leaves at once, so that nothing of it is pending while we watch.
    const write = (value) => push([delta(insider, { generation: 5, left: true, kvs: [['k', 1, encodeValue(value)]] })], [], { from: insider })

    // Its departure is the last event the frame causes.
    const taken = waitForEvent(victim, 'peer_failed', (peer) => peer === insider)
    const frameBytes = seal(write('sealed'), key, { generation: 5, recipient: recipientTag(victim.peer_name) })
    assert.equal((await sendRaw(port, frameBytes)).length, 0)
    await taken
    const events = record(victim)

    const refusals = [
      ['replayed', frameBytes],
      ['stale', seal(write('old'), key, { generation: 5, sentAt: Date.now() - 31000 })],
      ['stale', seal(write('ahead'), key, { generation: 5, sentAt: Date.now() + 31000 })],
      ['stale', seal(write('older incarnation'), key, { generation: 4 })],
      ['replayed', seal(write('for another node'), key, { generation: 5, recipient: recipientTag('127.0.0.1:9') })],
      ['replayed', seal(write('an answer out of the blue'), key, { generation: 5, answers: 12345n })],
      ['forged', seal(write('another cluster'), key, { generation: 5, cluster: 'other' })],
      ['unknownKey', seal(write('another key'), newKey(), { generation: 5 })],
    ]
    for (const [reason, bytes] of refusals) {
      const before = rejected()[reason]
      assert.equal((await sendRaw(port, bytes)).length, 0)
      await waitFor(() => rejected()[reason] === before + 1, 5000, () => `a ${reason} refusal; ${JSON.stringify(rejected())}`)
    }
    // A tampered copy of a fresh frame: every region of it.
    const fresh = seal(write('tampered'), key, { generation: 5 })
    const total = () => Object.values(rejected()).reduce((sum, n) => sum + n, 0)
    for (const at of [4, 5, 8, 12, 40, 80, fresh.length - 1]) {
      const tampered = Buffer.from(fresh)
      tampered[at] ^= 0x20
      const before = total()
      await sendRaw(port, tampered)
      await waitFor(() => total() === before + 1, 5000, `byte ${at} altered to be refused`)
    }
    await waitRounds(victim, nodes[1].peer_name, 3)
    assert.deepEqual(events, [])
    assert.equal(victim.peerValue(insider, 'k'), 'sealed')
  } finally {
    await stopAll(nodes)
  }
})

test('rotation while gossiping: install, use, remove everywhere without a false failure; a member left on the old key is cut off both ways', async () => {
  const [oldKey, newKey_] = [newKey(), newKey()]
  const nodes = await startCluster(4, { keys: [oldKey] })
  const laggard = new Gossiper({ ...FAST, port: 0, seeds: [nodes[0].peer_name], keys: [oldKey] })
  try {
    await laggard.start()
    await waitForMembership([...nodes, laggard])
    const events = new Map([...nodes, laggard].map((g) => [g, record(g)]))
    let round = 0
    // A write from every member, seen by every other member: the cluster works.
    async function everyoneHearsEveryone(members) {
      round++
      const arrivals = []
      for (const writer of members) {
        for (const reader of members) {
          if (reader !== writer) arrivals.push(waitFor(() => reader.peerValue(writer.peer_name, 'round') === round, 5000, `${reader.peer_name} to hear round ${round} of ${writer.peer_name}`))
        }
      }
      for (const writer of members) writer.setLocalState('round', round)
      await Promise.all(arrivals)
    }
    const settle = () => Promise.all(nodes.slice(1).map((g) => waitRounds(nodes[0], g.peer_name, 20)))

    for (const g of nodes) g.installKey(newKey_)
    await everyoneHearsEveryone([...nodes, laggard])
    for (const g of nodes) g.useKey(newKey_)
    await settle()
    // The laggard cannot read the new key, but its own exchanges are answered under the old.
    await everyoneHearsEveryone([...nodes, laggard])
    assert.ok(laggard.stats().rejected.unknownKey > 0)
    for (const g of nodes) assert.equal(g.removeKey(oldKey), true)
    for (const g of nodes) assert.deepEqual(g.listKeys(), [b64(newKey_)])
    await everyoneHearsEveryone(nodes)

    // Cut off both ways: each side reports the other failed and refuses its frames.
    await Promise.all(nodes.map((g) => waitFor(() => g.deadPeers().includes(laggard.peer_name), 10000, `${g.peer_name} to fail the laggard`)))
    await waitFor(() => laggard.livePeers().length === 0, 10000, 'the laggard to fail everyone')
    const refusedByNodes = nodes.reduce((sum, g) => sum + g.stats().rejected.unknownKey, 0)
    await waitFor(() => nodes.reduce((sum, g) => sum + g.stats().rejected.unknownKey, 0) > refusedByNodes, 5000, 'the laggard still knocking')
    laggard.setLocalState('after', 'cut')
    nodes[1].setLocalState('after', 'cut')
    await settle()
    assert.equal(laggard.peerValue(nodes[1].peer_name, 'after'), undefined)
    for (const g of nodes) assert.equal(g.peerValue(laggard.peer_name, 'after'), undefined)

    for (const g of nodes) {
      const failed = failedEvents(events.get(g)).map(([, peer]) => peer)
      assert.deepEqual(failed, [laggard.peer_name], `${g.peer_name}: only the laggard failed`)
      assert.equal(g.stats().rejected.forged, 0)
    }
  } finally {
    await stopAll([laggard, ...nodes])
  }
})

test('a member that missed useKey stays in the cluster after the old key is removed elsewhere', async () => {
  const [oldKey, newKey_] = [newKey(), newKey()]
  const nodes = await startCluster(4, { keys: [oldKey] })
  const [halfway, ...others] = nodes
  try {
    const events = nodes.map(record)
    for (const g of nodes) g.installKey(newKey_)
    for (const g of others) g.useKey(newKey_)
    // Without useKey first, the old key is halfway's primary and cannot be removed there.
    assert.throws(() => halfway.removeKey(oldKey), { code: 'ERR_GOSSIP_PRIMARY_KEY' })
    for (const g of others) g.removeKey(oldKey)
    await Promise.all(others.map((g) => waitRounds(g, halfway.peer_name, 20)))
    await waitFor(() => others.every((g) => g.stats().rejected.unknownKey > 0), 5000, "halfway's own frames to be refused")
    // Others' exchanges with it are answered under the new key: its writes still travel.
    halfway.setLocalState('still', 'here')
    for (const g of others) await waitFor(() => g.peerValue(halfway.peer_name, 'still') === 'here', 5000, `${g.peer_name} to hear halfway`)
    others[0].setLocalState('and', 'heard')
    await waitFor(() => halfway.peerValue(others[0].peer_name, 'and') === 'heard', 5000, 'halfway to hear the others')
    for (const list of events) assert.deepEqual(failedEvents(list), [])
  } finally {
    await stopAll(nodes)
  }
})

test('turning encryption on in a running cluster: two rolling restarts, without a false failure', async () => {
  const key = newKey()
  const members = await startCluster(3)
  const ports = members.map((g) => Number(g.peer_name.split(':')[1]))
  const recorders = []
  const restarts = new Map()
  let round = 0
  const watch = (g) => recorders.push(record(g))
  members.forEach(watch)
  async function everyoneHearsEveryone() {
    round++
    const arrivals = []
    for (const writer of members) {
      for (const reader of members) {
        if (reader !== writer) arrivals.push(waitFor(() => reader.peerValue(writer.peer_name, 'round') === round, 5000, `${reader.peer_name} to hear round ${round} of ${writer.peer_name}`))
      }
    }
    for (const writer of members) writer.setLocalState('round', round)
    await Promise.all(arrivals)
  }
  /** Restarts member i, as a new process on the same port would, with `options`. */
  async function restart(i, options) {
    await members[i].stop()
    restarts.set(members[i].peer_name, (restarts.get(members[i].peer_name) ?? 0) + 1)
    members[i] = new Gossiper({ ...FAST, port: ports[i], seeds: [members[(i + 1) % 3].peer_name], ...options })
    watch(members[i])
    await members[i].start()
    await waitForMembership(members)
    await everyoneHearsEveryone()
  }
  const plaintextAccepted = () => members.reduce((sum, g) => sum + g.stats().plaintextAccepted, 0)
  try {
    // 1. Every member in turn gets the key and accepts plaintext: members still without keys
    //    reach it, and it answers them in plaintext.
    for (let i = 0; i < 3; i++) {
      await restart(i, { keys: [key], acceptPlaintext: true })
      if (i < 2) assert.ok(members[i].stats().plaintextAccepted > 0, 'plaintext still arrives')
    }
    // Once every member seals, plaintext stops arriving: the sign to go on.
    await Promise.all(members.slice(1).map((g) => waitRounds(members[0], g.peer_name, 10)))
    const accepted = plaintextAccepted()
    await Promise.all(members.slice(1).map((g) => waitRounds(members[0], g.peer_name, 20)))
    assert.equal(plaintextAccepted(), accepted)

    // 2. Every member in turn stops accepting plaintext.
    for (let i = 0; i < 3; i++) await restart(i, { keys: [key] })
    await Promise.all(members.slice(1).map((g) => waitRounds(members[0], g.peer_name, 20)))
    for (const g of members) {
      assert.equal(g.stats().plaintextAccepted, 0)
      assert.equal(g.stats().rejected.plaintext, 0)
      assert.deepEqual(g.deadPeers(), [])
    }
    // The only failures reported were the restarts themselves, once each.
    for (const events of recorders) {
      const failed = new Map()
      for (const [name, peer] of events) if (name === 'peer_failed') failed.set(peer, (failed.get(peer) ?? 0) + 1)
      for (const [peer, count] of failed) assert.ok(count <= (restarts.get(peer) ?? 0), `${peer} failed ${count} times`)
    }
  } finally {
    await stopAll(members)
  }
})
