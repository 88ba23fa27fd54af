'use strict'
// Hand-built wire frames and raw TCP connections, for tests that play a (broken, hostile or
// simply scripted) peer. Format: 4-byte big-endian length, then two msgpack values: the header
// [version, clusterName, from, kind] and the payload of that kind (see src/wire.rs).

const assert = require('node:assert/strict')
const crypto = require('node:crypto')
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
  let header
  if (n < 16) header = Buffer.from([0x90 | n])
  else if (n < 0x10000) header = Buffer.from([0xdc, n >> 8, n & 0xff])
  else {
    header = Buffer.alloc(5)
    header[0] = 0xdd
    header.writeUInt32BE(n, 1)
  }
  return Buffer.concat([header, ...value.map(pack)])
}

function withLength(body) {
  const prefix = Buffer.alloc(4)
  prefix.writeUInt32BE(body.length)
  return Buffer.concat([prefix, body])
}

/** One frame: [version, cluster, from, kind] then the payload. */
function frame(kind, payload, { cluster = 'gossiper', from = FAKE_FROM, version = 2 } = {}) {
  return withLength(Buffer.concat([pack([version, cluster, from, kind]), pack(payload)]))
}

const SYN = 1
const ACK = 3
const PUSH = 4
const SUSPECT = 7

/** A Push: [deltas, forwardTo], the names the receiver should pass the deltas on to. */
const push = (deltas, forwardTo = [], options) => frame(PUSH, [deltas, forwardTo], options)

/** A Suspect: "I convicted `name` at `generation`, last heard at `heartbeat`". */
const suspect = (name, generation, heartbeat, forwardTo = [], options) => frame(SUSPECT, [name, generation, heartbeat, forwardTo], options)

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

// ---- sealed frames --------------------------------------------------------------------------
// Written from docs/protocol.md ("Sealed frames") with node:crypto alone, as a peer in another
// language would be: XChaCha20-Poly1305 is HChaCha20 then the IETF ChaCha20-Poly1305.

/** HChaCha20 (draft-irtf-cfrg-xchacha): a 32-byte subkey from a key and 16 bytes of nonce. */
function hchacha20(key, nonce16) {
  const s = new Uint32Array(16)
  s.set([0x61707865, 0x3320646e, 0x79622d32, 0x6b206574])
  for (let i = 0; i < 8; i++) s[4 + i] = key.readUInt32LE(4 * i)
  for (let i = 0; i < 4; i++) s[12 + i] = nonce16.readUInt32LE(4 * i)
  const rotl = (v, n) => ((v << n) | (v >>> (32 - n))) >>> 0
  const quarter = (a, b, c, d) => {
    s[a] += s[b]; s[d] = rotl(s[d] ^ s[a], 16)
    s[c] += s[d]; s[b] = rotl(s[b] ^ s[c], 12)
    s[a] += s[b]; s[d] = rotl(s[d] ^ s[a], 8)
    s[c] += s[d]; s[b] = rotl(s[b] ^ s[c], 7)
  }
  for (let round = 0; round < 10; round++) {
    quarter(0, 4, 8, 12); quarter(1, 5, 9, 13); quarter(2, 6, 10, 14); quarter(3, 7, 11, 15)
    quarter(0, 5, 10, 15); quarter(1, 6, 11, 12); quarter(2, 7, 8, 13); quarter(3, 4, 9, 14)
  }
  const out = Buffer.alloc(32)
  for (let i = 0; i < 4; i++) out.writeUInt32LE(s[i], 4 * i)
  for (let i = 0; i < 4; i++) out.writeUInt32LE(s[12 + i], 16 + 4 * i)
  return out
}

/** The 4-byte key id: HKDF-SHA256 of the key, no salt, info "gossiper key id". */
const keyId = (key) => Buffer.from(crypto.hkdfSync('sha256', key, Buffer.alloc(0), 'gossiper key id', 4))

/** A node name as a stamp's recipient: FNV-1a 64, never 0. */
function recipientTag(name) {
  let hash = 0xcbf29ce484222325n
  for (const byte of Buffer.from(name)) hash = ((hash ^ BigInt(byte)) * 0x100000001b3n) & 0xffffffffffffffffn
  return hash === 0n ? 1n : hash
}

/**
 * Seals a frame built by frame()/push() under `key`, as a peer holding the key would send it:
 * c1 01 01, key id, nonce, then XChaCha20-Poly1305 of the stamp and the frame body, the clear
 * header and the cluster name authenticated.
 */
function seal(plainFrame, key, { cluster = 'gossiper', sentAt = Date.now(), generation = 1, answers = 0n, recipient = 0n, nonce = crypto.randomBytes(24) } = {}) {
  const header = Buffer.concat([Buffer.from([0xc1, 1, 1]), keyId(key)])
  const stamp = Buffer.alloc(32)
  stamp.writeBigUInt64BE(BigInt(sentAt), 0)
  stamp.writeBigUInt64BE(BigInt(generation), 8)
  stamp.writeBigUInt64BE(BigInt(answers), 16)
  stamp.writeBigUInt64BE(BigInt(recipient), 24)
  const iv = Buffer.concat([Buffer.alloc(4), nonce.subarray(16)])
  const cipher = crypto.createCipheriv('chacha20-poly1305', hchacha20(key, nonce.subarray(0, 16)), iv, { authTagLength: 16 })
  cipher.setAAD(Buffer.concat([header, Buffer.from(cluster)]))
  const sealed = Buffer.concat([cipher.update(Buffer.concat([stamp, plainFrame.subarray(4)])), cipher.final(), cipher.getAuthTag()])
  return withLength(Buffer.concat([header, nonce, sealed]))
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
  FAKE_FROM, SYN, ACK, PUSH, SUSPECT, Raw, uint64, pack, withLength, frame, push, suspect, delta, garbage, sendRaw, parseFrame,
  hchacha20, keyId, recipientTag, seal,
}
