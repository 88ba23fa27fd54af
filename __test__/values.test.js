'use strict'

const { test } = require('node:test')
const assert = require('node:assert/strict')
const { encodeValue, decodeValue, Decoder } = require('../values.js')

const roundTrip = (v) => decodeValue(encodeValue(v))
const hex = (v) => encodeValue(v).toString('hex')

test('strings round-trip', () => {
  for (const s of ['', 'hello', 'héllo wörld ✓', '日本語', '😀👍🏽', 'x'.repeat(40), 'y'.repeat(300), 'z'.repeat(70000), 'ü'.repeat(20)]) {
    assert.equal(roundTrip(s), s)
  }
})

test('numbers round-trip', () => {
  const ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, Number.MAX_SAFE_INTEGER,
    -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, Number.MIN_SAFE_INTEGER]
  for (const n of [...ints, 0.1, -1.5, 1e300, NaN, Infinity, -Infinity, 2 ** 60]) {
    assert.equal(roundTrip(n), n)
  }
  assert.ok(Object.is(roundTrip(-0), -0))
})

test('integers use the smallest format', () => {
  const cases = [[127, '7f'], [-32, 'e0'], [-33, 'd0df'], [255, 'ccff'], [256, 'cd0100'], [-129, 'd1ff7f'],
    [65536, 'ce00010000'], [-32769, 'd2ffff7fff'], [2 ** 32, 'cf0000000100000000'],
    [-(2 ** 31) - 1, 'd3ffffffff7fffffff']]
  for (const [n, h] of cases) assert.equal(hex(n), h, String(n))
})

test('booleans, null and undefined', () => {
  assert.equal(roundTrip(true), true)
  assert.equal(roundTrip(false), false)
  assert.equal(roundTrip(null), null)
  assert.equal(roundTrip(undefined), null)
  assert.deepEqual(roundTrip({ a: undefined }), { a: null })
})

test('binary round-trips as a Buffer copy', () => {
  for (const n of [0, 10, 300, 70000]) {
    const b = Buffer.alloc(n, 0xab)
    assert.deepEqual(roundTrip(b), b)
  }
  assert.deepEqual(roundTrip(new Uint8Array([1, 2, 3])), Buffer.from([1, 2, 3]))

  const enc = encodeValue(Buffer.from([7, 8]))
  const out = decodeValue(enc)
  enc[2] = 0
  assert.deepEqual(out, Buffer.from([7, 8]))
})

test('arrays round-trip', () => {
  for (const n of [0, 15, 16, 70000]) {
    const a = Array.from({ length: n }, (_, i) => i % 3 ? i : 'v' + i)
    assert.deepEqual(roundTrip(a), a)
  }
})

test('objects round-trip', () => {
  for (const n of [15, 16, 70000]) {
    const o = {}
    for (let i = 0; i < n; i++) o['k' + i] = i
    assert.deepEqual(roundTrip(o), o)
  }
  const nested = { a: [1, { b: 'c', d: [null, true] }], e: { f: { g: 1.25 } }, 'ключ': 'значение' }
  assert.deepEqual(roundTrip(nested), nested)
})

test('a "__proto__" key becomes an own property', () => {
  const o = JSON.parse('{"__proto__": {"polluted": 1}, "x": 2}')
  const out = roundTrip(o)
  assert.equal(Object.getPrototypeOf(out), Object.prototype)
  assert.ok(Object.hasOwn(out, '__proto__'))
  assert.equal(out.polluted, undefined)
  assert.deepEqual(out, o)
})

test('toJSON is honoured (Date -> ISO string)', () => {
  const d = new Date('2024-01-02T03:04:05.678Z')
  assert.equal(roundTrip(d), d.toISOString())
  assert.deepEqual(roundTrip({ when: d }), { when: d.toISOString() })
})

test('a shared non-cyclic sub-object is allowed', () => {
  const shared = { x: 1 }
  const v = { a: shared, b: [shared, shared] }
  assert.deepEqual(roundTrip(v), { a: { x: 1 }, b: [{ x: 1 }, { x: 1 }] })
})

test('golden encodings', () => {
  assert.equal(hex(0), '00')
  assert.equal(hex(-1), 'ff')
  assert.equal(hex(128), 'cc80')
  assert.equal(hex('a'), 'a161')
  assert.equal(hex([1, true, null]), '9301c3c0')
  assert.equal(hex({ a: 1 }), '81a16101')
  assert.equal(hex(1.5), 'cb3ff8000000000000')
  assert.equal(hex(Buffer.from([1, 2])), 'c4020102')
})

test('unsupported types throw TypeError naming the argument', () => {
  const bad = { function: () => {}, symbol: Symbol('s'), BigInt: 1n }
  for (const [what, v] of Object.entries(bad)) {
    for (const input of [v, { nested: [1, v] }]) {
      assert.throws(() => encodeValue(input), { name: 'TypeError', message: new RegExp(`"value".*${what}`) })
      assert.throws(() => encodeValue(input, 'state'), { name: 'TypeError', message: /"state"/ })
    }
  }
})

test('cycles throw TypeError', () => {
  const o = { a: {} }
  o.a.back = o
  const a = [1]
  a.push([a])
  for (const v of [o, a]) {
    assert.throws(() => encodeValue(v), { name: 'TypeError', message: 'The "value" argument must not be cyclic' })
  }
})

test('nesting deeper than 512 levels throws RangeError', () => {
  const nest = (n) => {
    let v = 0
    for (let i = 0; i < n; i++) v = [v]
    return v
  }
  assert.deepEqual(roundTrip(nest(512)), nest(512))
  assert.throws(() => encodeValue(nest(600)), {
    name: 'RangeError', message: 'The "value" argument is nested deeper than 512 levels',
  })
})

test('every truncated prefix throws RangeError', () => {
  const samples = [
    { s: 'str', n: [1, -200, 70000, -(2 ** 40), 1.5], b: Buffer.from([1, 2, 3]), t: true, z: null },
    'x'.repeat(300), 2 ** 40, -(2 ** 31) - 1, Buffer.alloc(300), Array(20).fill('ab'),
  ]
  for (const v of samples) {
    const enc = encodeValue(v)
    for (let len = 0; len < enc.length; len++) {
      assert.throws(() => decodeValue(enc.subarray(0, len)), RangeError, `prefix ${len} of ${enc.length}`)
    }
  }
})

test('foreign formats decode', () => {
  const dec = (h) => decodeValue(Buffer.from(h, 'hex'))
  assert.equal(dec('ca3fc00000'), 1.5) // float32
  assert.equal(dec('d9026869'), 'hi') // str8 for a short string
  assert.equal(dec('cfffffffffffffffff'), 2 ** 64) // beyond safe range: lossy Number
  assert.equal(dec('d3ffffffffffffffff'), -1)
  assert.deepEqual(dec('8201a178c3a179'), { 1: 'x', true: 'y' }) // non-string keys
  assert.deepEqual(dec('d4ff07'), { type: -1, data: Buffer.from([7]) }) // fixext1
  assert.deepEqual(dec('c70205aabb'), { type: 5, data: Buffer.from([0xaa, 0xbb]) }) // ext8
  assert.throws(() => dec('ddffffffff'), RangeError) // huge count, no data
})

test('reserved byte 0xc1 throws', () => {
  assert.throws(() => decodeValue(Buffer.from([0xc1])), Error)
  assert.throws(() => decodeValue(Buffer.from([0x91, 0xc1])), Error)
})

test('Decoder walks consecutive items', () => {
  const buf = Buffer.concat([encodeValue('key-1'), encodeValue({ v: [1, 2] }), encodeValue(-7)])
  const d = new Decoder(buf)
  const items = []
  while (!d.done()) items.push(d.next())
  assert.deepEqual(items, ['key-1', { v: [1, 2] }, -7])
  assert.equal(decodeValue(buf, encodeValue('key-1').length + encodeValue({ v: [1, 2] }).length), -7)
})
