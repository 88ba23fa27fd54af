'use strict'
// The datagram path: a settled cluster's rounds go by UDP, and hostile datagrams sent with
// node:dgram to one node (garbage, truncated, oversized, another cluster or version, senders
// that are not peers, replies nobody asked for) are dropped and counted, never answered, and
// never disturb the cluster.

const { describe, test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const dgram = require('node:dgram')
const { startCluster, stopAll, waitFor, waitForEvent } = require('./helpers')
const { SYN, ACK, frame, garbage, delta, uint64 } = require('./frames')

const SYN_ACK = 2
const COMPACT_SYN = 5
const NEED_DIGEST = 6

/** A frame as a datagram carries it: without the 4-byte length. */
const datagram = (...args) => frame(...args).subarray(4)

describe('datagrams to one node of a live 3-node cluster', () => {
  let nodes
  let victim
  let socket
  const answers = []

  before(async () => {
    nodes = await startCluster(3)
    victim = nodes[1]
    socket = dgram.createSocket('udp4')
    socket.on('message', (message) => answers.push(message))
    await new Promise((resolve) => socket.bind(0, '127.0.0.1', resolve))
  })

  after(async () => {
    if (socket) socket.close()
    if (nodes) await stopAll(nodes)
  })

  const rejected = () => victim.stats().rejected

  /** Sends `bytes` to the victim's UDP port and waits for the `reason` counter to rise. */
  async function expectRejected(reason, bytes) {
    const before = rejected()
    assert.ok(reason in before, `'${reason}' is a rejection counter`)
    const [host, port] = victim.peer_name.split(':')
    await new Promise((resolve, reject) => socket.send(bytes, Number(port), host, (e) => (e ? reject(e) : resolve())))
    await waitFor(() => rejected()[reason] >= before[reason] + 1, 5000,
      () => `rejected.${reason} to rise from ${before[reason]}; now ${JSON.stringify(rejected())}`)
  }

  test('a settled cluster exchanges by datagram', async () => {
    await waitFor(() => nodes.every((g) => g.stats().datagramExchanges > 0), 10000,
      () => `datagram exchanges on every node: ${nodes.map((g) => g.stats().datagramExchanges)}`)
  })

  test('garbage, truncated and oversized datagrams are malformed or oversized', async () => {
    for (const seed of [1, 2, 3]) {
      const before = rejected()
      await expectRejected('malformed', garbage(300, seed)).catch(async () => {
        // Random bytes may happen to start like a header of another version.
        assert.ok(Object.entries(rejected()).some(([reason, n]) => n > before[reason]), 'garbage counted')
      })
    }
    await expectRejected('malformed', datagram(ACK, [[]]).subarray(0, 10))
    await expectRejected('oversized', garbage(1401, 4))
    await expectRejected('oversized', Buffer.alloc(9000, 0x94))
  })

  test('another cluster or protocol version is counted as such', async () => {
    await expectRejected('wrongCluster', datagram(ACK, [[]], { cluster: 'other' }))
    await expectRejected('wrongVersion', datagram(ACK, [[]], { version: 1 }))
  })

  test('digests from strangers and replies nobody asked for are unsolicited, never answered', async () => {
    await expectRejected('unsolicited', datagram(COMPACT_SYN, [uint64(0n), Buffer.alloc(0)]))
    await expectRejected('unsolicited', datagram(ACK, [[delta('127.0.0.1:7')]]))
    await expectRejected('unsolicited', datagram(SYN_ACK, [[], [], Buffer.alloc(0)]))
    await expectRejected('unsolicited', datagram(NEED_DIGEST, null))
    // Only the compact exchange travels by datagram.
    await expectRejected('unexpected', datagram(SYN, [[]]))
  })

  test('afterwards: nothing was answered, no peer added, and writes still reach everyone', async () => {
    assert.deepEqual(answers, [], 'a hostile datagram was answered')
    for (const g of nodes) {
      assert.deepEqual(g.allPeers(), nodes.filter((o) => o !== g).map((o) => o.peer_name).sort())
      assert.deepEqual(g.deadPeers(), [])
    }
    const arrivals = nodes.filter((g) => g !== victim)
      .map((g) => waitForEvent(g, 'update', (peer, key) => peer === victim.peer_name && key === 'after', 5000))
    victim.setLocalState('after', 'datagrams')
    for (const [, , value] of await Promise.all(arrivals)) assert.equal(value, 'datagrams')
    const exchanges = victim.stats().datagramExchanges
    await waitFor(() => victim.stats().datagramExchanges > exchanges, 10000, 'the victim to exchange by datagram again')
  })
})
