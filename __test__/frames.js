'use strict'
// Hand-built wire frames and raw TCP connections, for tests that play a (broken, hostile or
// simply scripted) peer. Format: 4-byte big-endian length, then two msgpack values: the header
// [version, clusterName, from, kind] and the payload of that kind (see src/wire.rs).

const assert = require('node:assert/strict')
const net = require('node:net')
const { encodeValue, Decoder } = require('../values')

const FAKE_FROM = '127.0.0.1:1'

// ---- frame building -------------------------------------------------------------------------

/** Bytes to splice into a packed value as they are (for encodings encodeValue never produces). */
class Raw {
  constructor(bytes) {
    this.bytes = bytes
  }
}

/** A msgpack uint64 (0xcf): encodeValue writes integers beyond 2**53 as float64. */
const uint64 = (n) => {
  const bytes = Buffer.alloc(9)
  bytes[0] = 0xcf
  bytes.writeBigUInt64BE(BigInt(n), 1)
  return new Raw(bytes)
}

/** encodeValue, except that arrays may contain Raw pieces. */
function pack(value) {
  if (value instanceof Raw) return value.bytes
  if (!Array.isArray(value)) return encodeValue(value)
  const n = value.length
  const header = n < 16 ? Buffer.from([0x90 | n]) : Buffer.from([0xdc, n >> 8, n & 0xff])
  return Buffer.concat([header, ...value.map(pack)])
}

function withLength(body) {
  const prefix = Buffer.alloc(4)
  prefix.writeUInt32BE(body.length)
  return Buffer.concat([prefix, body])
}

/** One frame: [version, cluster, from, kind] then the payload. */
function frame(kind, payload, { cluster = 'gossiper', from = FAKE_FROM, version = 1 } = {}) {
  return withLength(Buffer.concat([pack([version, cluster, from, kind]), pack(payload)]))
}

const SYN = 1
const ACK = 3
const PUSH = 4

/** A Push: [deltas, forwardTo], the names the receiver should pass the deltas on to. */
const push = (deltas, forwardTo = [], options) => frame(PUSH, [deltas, forwardTo], options)

/** [name, generation, heartbeat, fromVersion, toVersion, left, [[key, version, bin], ...]] */
function delta(name, { generation = 1, heartbeat = 1, left = false, kvs = [['k', 1, encodeValue('v')]] } = {}) {
  const toVersion = (kvs.length === 0 ? 0 : kvs[kvs.length - 1][1]) + (left ? 1 : 0)
  return [name, generation, heartbeat, 0, toVersion, left, kvs]
}

/** Deterministic pseudo-random bytes (xorshift32), so a failure reproduces. */
function garbage(length, seed) {
  const out = Buffer.alloc(length)
  let x = seed >>> 0 || 1
  for (let i = 0; i < length; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out[i] = x & 0xff
  }
  return out
}

// ---- raw connections ------------------------------------------------------------------------

/**
 * Connects to 127.0.0.1:port, writes `bytes` (then half-closes unless `keepOpen`), and resolves
 * with whatever the node sent back once the connection is fully closed.
 */
function sendRaw(port, bytes, { keepOpen = false, timeoutMs = 8000 } = {}) {
  return new Promise((resolve, reject) => {
    const received = []
    const socket = net.connect(port, '127.0.0.1')
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`raw connection to ${port} was not closed within ${timeoutMs} ms`))
    }, timeoutMs)
    // The node may reset the connection on us; that is an acceptable way to drop it.
    socket.on('error', () => {})
    socket.on('data', (chunk) => received.push(chunk))
    socket.on('connect', () => {
      socket.write(bytes)
      if (!keepOpen) socket.end()
    })
    socket.on('close', () => {
      clearTimeout(timer)
      resolve(Buffer.concat(received))
    })
  })
}

/** Reads one reply frame: { header, payload }. */
function parseFrame(bytes) {
  assert.ok(bytes.length >= 4, `a reply frame, got ${bytes.length} bytes`)
  const length = bytes.readUInt32BE(0)
  assert.equal(bytes.length, 4 + length, 'exactly one frame')
  const d = new Decoder(bytes.subarray(4))
  const header = d.next()
  const payload = d.next()
  assert.ok(d.done())
  return { header, payload }
}

module.exports = {
  FAKE_FROM, SYN, ACK, PUSH, Raw, uint64, pack, withLength, frame, push, delta, garbage, sendRaw, parseFrame,
}
