'use strict'
// Hostile and broken peers: raw TCP connections to one node of a live 3-node cluster send
// garbage and crafted frames. Each must be dropped and counted under the right reason, never
// add a peer, and never disturb the cluster.

const { describe, test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { encodeValue, decodeValue } = require('../values')
const { startCluster, stopAll, waitFor, waitForEvent, waitRounds } = require('./helpers')
const {
  FAKE_FROM, SYN, ACK, Raw, uint64, pack, withLength, frame, push, delta, garbage, sendRaw, parseFrame,
} = require('./frames')

const BOGUS_NAMES = ['evil', 'not-an-address:1', '127.0.0.1:1', '127.000.0.1:1']

// ---- the tests ------------------------------------------------------------------------------

describe('hostile input to one node of a live 3-node cluster', () => {
  let nodes
  let victim
  let port
  const bogusPeerEvents = []

  before(async () => {
    nodes = await startCluster(3, { idleTimeout: 1000 })
    victim = nodes[1]
    port = Number(victim.peer_name.split(':')[1])
    for (const g of nodes) {
      for (const kind of ['new_peer', 'peer_alive', 'update']) {
        g.on(kind, (peer) => { if (BOGUS_NAMES.includes(peer)) bogusPeerEvents.push([g.peer_name, kind, peer]) })
      }
    }
    nodes[0].setLocalState('before', 'attack')
    await waitFor(() => nodes.every((g) => g === nodes[0] || g.peerValue(nodes[0].peer_name, 'before') === 'attack'),
      5000, 'the first value to spread')
  })

  after(async () => {
    if (nodes) await stopAll(nodes)
  })

  const rejected = () => victim.stats().rejected

  /** Sends `bytes` on a fresh connection and waits for the `reason` counter to rise by one. */
  async function expectRejected(reason, bytes, options) {
    const before = rejected()
    assert.ok(reason in before, `'${reason}' is a rejection counter`)
    const reply = await sendRaw(port, bytes, options)
    assert.equal(reply.length, 0, 'a dropped frame gets no reply')
    await waitFor(() => rejected()[reason] >= before[reason] + 1, 5000,
      () => `rejected.${reason} to rise from ${before[reason]}; now ${JSON.stringify(rejected())}`)
    const after = rejected()
    for (const [other, count] of Object.entries(after)) {
      if (other !== reason) assert.equal(count, before[other], `only '${reason}' rose, not '${other}'`)
    }
  }

  test('the frame builder is sound: a well-formed Syn gets a SynAck describing every node', async () => {
    victim.setLocalState('own', 'state')
    const reply = parseFrame(await sendRaw(port, frame(SYN, [[]])))
    assert.deepEqual(reply.header, [2, 'gossiper', victim.peer_name, 2])
    const [deltas, requests] = reply.payload
    assert.deepEqual(requests, [])
    assert.deepEqual(deltas.map((d) => d[0]).sort(), nodes.map((g) => g.peer_name).sort())
    // The responder's own state in full, with its keys...
    const own = deltas.find((d) => d[0] === victim.peer_name)
    const [key, , value] = own[6].at(-1)
    assert.equal(key, 'own')
    assert.equal(decodeValue(value), 'state')
    // ...and the other nodes announced, without their keys: [name, generation, heartbeat,
    // maxVersion, maxVersion, left, []]. A stranger learns those from them, or once it trusts them.
    const seedDelta = deltas.find((d) => d[0] === nodes[0].peer_name)
    assert.equal(seedDelta[3], seedDelta[4])
    assert.ok(seedDelta[4] >= 1, 'the max version of the seed, who wrote a key')
    assert.deepEqual(seedDelta[6], [])
  })

  test('random garbage bytes are dropped as oversized or malformed', async () => {
    for (const seed of [1, 2, 3]) {
      const before = rejected()
      assert.equal((await sendRaw(port, garbage(300, seed))).length, 0)
      await waitFor(() => {
        const now = rejected()
        return now.oversized + now.malformed > before.oversized + before.malformed
      }, 5000, () => `garbage #${seed} to be counted; ${JSON.stringify(rejected())}`)
    }
    // Garbage inside a plausible length prefix fails to decode as a header.
    await expectRejected('malformed', withLength(garbage(100, 4)))
  })

  test('a truncated frame (length 100, then 10 bytes and close) is malformed', async () => {
    const bytes = Buffer.concat([Buffer.from([0, 0, 0, 100]), garbage(10, 5)])
    await expectRejected('malformed', bytes)
  })

  test('an oversized length prefix (0xffffffff) is rejected without waiting for the body', async () => {
    // The connection stays open on our side: the node must close it itself.
    await expectRejected('oversized', Buffer.concat([Buffer.from([0xff, 0xff, 0xff, 0xff]), garbage(16, 6)]), { keepOpen: true })
  })

  test('a well-formed frame for another cluster is counted as wrongCluster', async () => {
    await expectRejected('wrongCluster', frame(SYN, [[]], { cluster: 'other-cluster' }))
    await expectRejected('wrongCluster', push([delta('127.0.0.1:2')], [], { cluster: 'gossiper2' }))
  })

  test('another protocol version is counted as wrongVersion', async () => {
    await expectRejected('wrongVersion', frame(SYN, [[]], { version: 1 }))
  })

  test('an unknown message kind (9) is counted as unknownKind', async () => {
    await expectRejected('unknownKind', frame(9, [[]]))
    await expectRejected('unknownKind', frame(0, { type: 0, digest: { evil: 1 } }))
  })

  test("a Syn whose digest names 'evil' is counted as badName", async () => {
    // The original library crashed on {type: 0, digest: {evil: 1}}.
    await expectRejected('badName', frame(SYN, [[['evil', 1, 1, 1]]]))
    await expectRejected('badName', frame(SYN, [[[victim.peer_name, 1, 1, 0], ['evil', 1, 1, 1]]]))
    // A sender that does not name itself as ip:port is dropped as well.
    await expectRejected('badName', frame(SYN, [[]], { from: 'localhost:1' }))
  })

  test("Pushes naming 'not-an-address:1' or a non-canonical address are counted as badName", async () => {
    await expectRejected('badName', push([delta('not-an-address:1')]))
    await expectRejected('badName', push([delta('127.000.0.1:1')]))
  })

  test("a Push naming '127.0.0.1:1' with generation 2**60 is out of bounds", async () => {
    const hostile = ['127.0.0.1:1', uint64(2n ** 60n), 1, 0, 1, false, [['k', 1, encodeValue('v')]]]
    await expectRejected('outOfBounds', push([hostile]))
    // The same number as encodeValue writes it (a float64) is not a valid counter at all.
    const asFloat = ['127.0.0.1:1', 2 ** 60, 1, 0, 1, false, [['k', 1, encodeValue('v')]]]
    const before = rejected()
    await sendRaw(port, push([asFloat]))
    await waitFor(() => rejected().malformed + rejected().outOfBounds > before.malformed + before.outOfBounds,
      5000, 'the float generation to be rejected')
    // Versions that do not rise inside the delta's range are refused too.
    const disordered = ['127.0.0.1:3', 1, 1, 0, 2, false, [['a', 2, encodeValue(1)], ['b', 1, encodeValue(2)]]]
    await expectRejected('outOfBounds', push([disordered]))
  })

  test('a Push whose value bytes are not msgpack is counted as badKeyValue', async () => {
    await expectRejected('badKeyValue', push([delta('127.0.0.1:4', { kvs: [['k', 1, Buffer.from([0xc1])]] })]))
    // Two values where one is expected, and a truncated one.
    await expectRejected('badKeyValue', push([delta('127.0.0.1:4', { kvs: [['k', 1, Buffer.from([0x01, 0x02])]] })]))
    await expectRejected('badKeyValue', push([delta('127.0.0.1:4', { kvs: [['k', 1, Buffer.from([0xa5, 0x61])]] })]))
    await expectRejected('badKeyValue', push([delta('127.0.0.1:4', { kvs: [['', 1, encodeValue(1)]] })]))
  })

  test("a Push whose forwardTo names 'evil', or too many nodes, is rejected", async () => {
    await expectRejected('badName', push([delta('127.0.0.1:6')], ['evil']))
    await expectRejected('badName', push([delta('127.0.0.1:6')], [nodes[0].peer_name, 'not-an-address:1']))
    const tooMany = Array.from({ length: 8193 }, (_, i) => `127.0.0.1:${1 + (i % 60000)}`)
    await expectRejected('outOfBounds', push([delta('127.0.0.1:6')], tooMany))
  })

  /** A delta that changes nothing: a real node's current generation, no versions, heartbeat 0. */
  function noopDelta() {
    const target = nodes[0].peer_name
    const { generation } = victim.peerDetails().find((d) => d.name === target)
    return [target, generation, 0, 0, 0, false, []]
  }

  test('a Push cannot make the node contact an address that is not a live peer', async () => {
    let contacted = 0
    const trap = net.createServer((socket) => {
      contacted++
      socket.destroy()
    })
    await new Promise((resolve) => trap.listen(0, '127.0.0.1', resolve))
    try {
      const trapName = `127.0.0.1:${trap.address().port}`
      const before = rejected()
      // The node forwards before it closes the connection, so once it is closed, it is done.
      assert.equal((await sendRaw(port, push([noopDelta()], [trapName, trapName]))).length, 0)
      assert.deepEqual(rejected(), before, 'the Push itself was well-formed and accepted')
      await waitRounds(victim, nodes[0].peer_name, 5)
      assert.equal(contacted, 0, 'the node connected to a name it only read in forwardTo')
      assert.ok(!victim.allPeers().includes(trapName))
    } finally {
      await new Promise((resolve) => trap.close(resolve))
    }
  })

  test('one Push with a forwardTo of duplicates costs no more pushes than an honest broadcast', async () => {
    const others = nodes.filter((g) => g !== victim).map((g) => g.peer_name)
    const forwardTo = Array.from({ length: 8000 }, (_, i) => others[i % others.length])
    const pushes = () => nodes.reduce((sum, g) => sum + g.stats().pushesSent, 0)
    const before = pushes()
    await sendRaw(port, push([noopDelta()], forwardTo))
    await Promise.all(others.map((name) => waitRounds(victim, name, 5)))
    // An honest broadcast reaches each of the 2 other nodes once.
    assert.ok(pushes() - before <= others.length, `one hostile frame caused ${pushes() - before} pushes`)
  })

  test('trailing bytes after the payload are malformed; an Ack out of the blue is unexpected', async () => {
    const trailing = push([])
    const body = Buffer.concat([trailing.subarray(4), Buffer.from([0xc0])])
    await expectRejected('malformed', withLength(body))
    await expectRejected('unexpected', frame(ACK, [[]]))
  })

  test('absurd declared lengths inside a frame are malformed, not allocated', async () => {
    const hugeArray = new Raw(Buffer.from([0xdd, 0xff, 0xff, 0xff, 0xff]))
    await expectRejected('malformed', frame(SYN, [hugeArray]))
    await expectRejected('malformed', push([['127.0.0.1:5', 1, 1, 0, 1, false, hugeArray]]))
    const hugeString = new Raw(Buffer.from([0xdb, 0xff, 0xff, 0xff, 0xf0, 0x61]))
    await expectRejected('malformed', withLength(pack([1, hugeString, FAKE_FROM, SYN])))
    // Maps where arrays belong, and a header that is not an array at all.
    await expectRejected('malformed', withLength(Buffer.concat([encodeValue({ v: 1 }), encodeValue([[]])])))
    await expectRejected('malformed', withLength(encodeValue('just a string')))
  })

  test('a connection that sends nothing is closed after idleTimeout', async () => {
    const started = Date.now()
    const reply = await sendRaw(port, Buffer.alloc(0), { keepOpen: true, timeoutMs: 6000 })
    assert.equal(reply.length, 0)
    assert.ok(Date.now() - started >= 900, `closed after ${Date.now() - started} ms, before idleTimeout`)
  })

  test('a burst of hostile connections at once is survived', async () => {
    const frames = [
      garbage(64, 7), withLength(garbage(64, 8)), frame(9, [[]]), frame(SYN, [[['evil', 1, 1, 1]]]),
      push([delta('not-an-address:1')]), frame(SYN, [[]], { cluster: 'x' }),
      Buffer.from([0xff, 0xff, 0xff, 0xff]), Buffer.from([0, 0, 0, 50, 1, 2]),
    ]
    const sends = []
    for (let i = 0; i < 64; i++) sends.push(sendRaw(port, frames[i % frames.length]))
    await Promise.all(sends)
  })

  test('afterwards: no bogus peer was added, nothing crashed, and fresh writes reach all 3 nodes', async () => {
    for (const g of nodes) {
      for (const name of BOGUS_NAMES) {
        assert.ok(!g.allPeers().includes(name), `${g.peer_name} lists ${name}`)
        assert.equal(g.peerValue(name, 'k'), undefined)
      }
      assert.deepEqual(g.allPeers(), nodes.filter((o) => o !== g).map((o) => o.peer_name).sort())
      assert.deepEqual(g.deadPeers(), [])
    }
    assert.deepEqual(bogusPeerEvents, [])

    const writer = nodes[2]
    const arrivals = nodes.filter((g) => g !== writer)
      .map((g) => waitForEvent(g, 'update', (peer, key) => peer === writer.peer_name && key === 'after', 5000))
    writer.setLocalState('after', { survived: true })
    for (const [, , value] of await Promise.all(arrivals)) assert.deepEqual(value, { survived: true })

    // The attacked node itself still writes and is heard.
    victim.setLocalState('victim', 'fine')
    await waitFor(() => nodes.every((g) => g === victim || g.peerValue(victim.peer_name, 'victim') === 'fine'),
      5000, "the victim's write to spread")

    const counts = rejected()
    assert.ok(counts.wrongCluster >= 1 && counts.badName >= 1 && counts.unknownKind >= 1, JSON.stringify(counts))
    assert.ok(counts.oversized >= 1 && counts.malformed >= 1 && counts.outOfBounds >= 1, JSON.stringify(counts))
    assert.ok(counts.badKeyValue >= 1, JSON.stringify(counts))
  })
})
