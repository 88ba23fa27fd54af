'use strict'

const { test } = require('node:test')
const assert = require('node:assert/strict')
const vm = require('node:vm')
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

test('unsupported types throw TypeError naming the argument, and the path to them', () => {
  const bad = { function: () => {}, symbol: Symbol('s'), BigInt: 1n }
  for (const [what, v] of Object.entries(bad)) {
    const message = (path) => `The "${path}" argument must not be a ${what}`
    assert.throws(() => encodeValue(v), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: message('value') })
    assert.throws(() => encodeValue(v, 'state'), { name: 'TypeError', message: message('state') })
    assert.throws(() => encodeValue({ nested: [1, v] }), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: message('value.nested[1]') })
    assert.throws(() => encodeValue({ nested: [1, v] }, 'state'), { name: 'TypeError', message: message('state.nested[1]') })
  }
})

test('strings with a lone surrogate are refused, as values and as object keys, naming the path', () => {
  // Short (ASCII fast path bails out), long (>= 32 units), at the start, middle and end, and a
  // low surrogate before a high one (two lone surrogates, not a pair).
  const bad = ['x\uD800', 'x\uDC00', '\uDBFFy', 'a\uDC00\uD800b', '\uD83D', 'é'.repeat(40) + '\uD800',
    'x'.repeat(100) + '\uDFFF' + 'y'.repeat(100), '😀'.slice(0, 1)]
  for (const s of bad) {
    const value = { message: /^The "value" argument must not contain a lone surrogate \(U\+D[89A-F][0-9A-F]{2} at index \d+\), which UTF-8 cannot carry$/ }
    assert.throws(() => encodeValue(s), { name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE', ...value }, JSON.stringify(s))
    assert.throws(() => encodeValue({ list: [0, { text: s }] }), {
      name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE', message: /^The "value\.list\[1\]\.text" argument must not contain a lone surrogate/,
    }, JSON.stringify(s))
    // A refused key names the object that holds it, and shows the key escaped.
    assert.throws(() => encodeValue({ outer: { [s]: 1 } }), {
      name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE', message: /^The "value\.outer" argument must not have a key \(".*"\) that contains a lone surrogate \(U\+D[89A-F][0-9A-F]{2} at index \d+\)/,
    }, JSON.stringify(s))
  }
  assert.throws(() => encodeValue('ab\uDC00'), { message: /\(U\+DC00 at index 2\)/ })
  assert.throws(() => encodeValue([{ 'x\uD800': 1 }]), {
    message: 'The "value[0]" argument must not have a key ("x\\ud800") that contains a lone surrogate (U+D800 at index 1), which UTF-8 cannot carry',
  })
  // Well-formed pairs, U+FFFD itself and the neighbours of the surrogate range are fine.
  for (const s of ['😀', 'x\uD800\uDC00', '\uFFFD', '\uD7FF\uE000', '\uDBFF\uDFFF'.repeat(20)]) {
    assert.equal(roundTrip(s), s)
    assert.deepEqual(roundTrip({ [s]: s }), { [s]: s })
  }
})

test('Map, Set, typed arrays other than Uint8Array, buffers, boxed primitives and class instances are refused', () => {
  class Point {
    constructor() {
      this.x = 1
    }
  }
  const refused = [
    [new Map([[1, 2]]), 'a Map'],
    [new Set([1]), 'a Set'],
    [new WeakMap(), 'a WeakMap'],
    [new WeakSet(), 'a WeakSet'],
    [new Int8Array(2), 'an Int8Array'],
    [new Uint8ClampedArray(2), 'a Uint8ClampedArray'],
    [new Int16Array(2), 'an Int16Array'],
    [new Uint16Array(2), 'a Uint16Array'],
    [new Int32Array(2), 'an Int32Array'],
    [new Uint32Array(2), 'a Uint32Array'],
    [new Float32Array(2), 'a Float32Array'],
    [new Float64Array(2), 'a Float64Array'],
    [new BigInt64Array(2), 'a BigInt64Array'],
    [new BigUint64Array(2), 'a BigUint64Array'],
    [new DataView(new ArrayBuffer(2)), 'a DataView'],
    [new ArrayBuffer(2), 'an ArrayBuffer'],
    [new SharedArrayBuffer(2), 'a SharedArrayBuffer'],
    [new String('s'), 'a boxed String'],
    [new Number(1), 'a boxed Number'],
    [new Boolean(false), 'a boxed Boolean'],
    [Object(Symbol('s')), 'a boxed Symbol'],
    [Object(1n), 'a boxed BigInt'],
    [new Point(), 'an instance of Point'],
    [new Error('e'), 'an instance of Error'],
    [/re/g, 'an instance of RegExp'],
    [Promise.resolve(), 'an instance of Promise'],
    [Object.create(Object.create(null)), 'an object whose prototype is neither Object.prototype nor null'],
    [vm.runInNewContext('new Map()'), 'a Map'],
    [vm.runInNewContext('new Float64Array(1)'), 'a Float64Array'],
  ]
  for (const [v, what] of refused) {
    const type = { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' }
    assert.throws(() => encodeValue(v), { ...type, message: new RegExp(`^The "value" argument must not be ${what} \\(`) }, what)
    assert.throws(() => encodeValue({ items: [1, 2, 3, v] }), {
      ...type, message: new RegExp(`^The "value\\.items\\[3\\]" argument must not be ${what} \\(`),
    }, what)
    assert.throws(() => encodeValue([{ 'a b': { c: v } }], 'state'), {
      ...type, message: new RegExp(`^The "state\\[0\\]\\["a b"\\]\\.c" argument must not be ${what} \\(`),
    }, what)
  }
  assert.throws(() => encodeValue(new Map()), {
    message: 'The "value" argument must not be a Map (values carry only plain objects, arrays, Buffers/Uint8Arrays and objects with a toJSON() method)',
  })
  // A large typed array is refused by its type, whatever its length.
  assert.throws(() => encodeValue(new Float64Array(1 << 16)), { name: 'TypeError', message: /Float64Array/ })
})

test('plain, null-prototype and other-realm objects are carried; toJSON() is the way for others', () => {
  const bare = Object.assign(Object.create(null), { a: 1, b: [Object.assign(Object.create(null), { c: 'd' })] })
  assert.deepEqual(roundTrip(bare), { a: 1, b: [{ c: 'd' }] })
  assert.equal(hex(bare), hex({ a: 1, b: [{ c: 'd' }] }))
  // Objects and bytes from a vm context (another realm's Object.prototype and Uint8Array).
  const foreign = vm.runInNewContext('({ n: 1, list: [true, { s: "x" }], bytes: new Uint8Array([1, 2]) })')
  assert.deepEqual(roundTrip(foreign), { n: 1, list: [true, { s: 'x' }], bytes: Buffer.from([1, 2]) })
  // A Uint8Array subclass is still bytes.
  class Bytes extends Uint8Array {}
  assert.deepEqual(roundTrip(new Bytes([3, 4])), Buffer.from([3, 4]))
  // A class, or a Map subclass, with toJSON is stored as what toJSON returns.
  class Money {
    constructor(cents) {
      this.cents = cents
    }
    toJSON() {
      return { cents: this.cents, currency: 'EUR' }
    }
  }
  class Registry extends Map {
    toJSON() {
      return Object.fromEntries(this)
    }
  }
  assert.deepEqual(roundTrip({ price: new Money(250), reg: new Registry([['k', 1]]) }),
    { price: { cents: 250, currency: 'EUR' }, reg: { k: 1 } })
  // toJSON is applied once: a result that needs it again is refused, at the same path.
  assert.throws(() => encodeValue({ when: { toJSON: () => new Date(0) } }), {
    name: 'TypeError', message: /^The "value\.when" argument must not be an instance of Date/,
  })
  assert.throws(() => encodeValue({ when: { toJSON: () => ({ inner: new Set() }) } }), {
    message: /^The "value\.when\.inner" argument must not be a Set/,
  })
})

test('paths quote keys that are not identifiers and shorten long ones', () => {
  const long = 'k'.repeat(50)
  assert.throws(() => encodeValue({ 'with space': [{ $ok_1: { '0': { [long]: 1n } } }] }), {
    message: `The "value["with space"][0].$ok_1["0"]["${'k'.repeat(40)}..."]" argument must not be a BigInt`,
  })
  assert.throws(() => encodeValue({ 'quote"d': () => 1 }), { message: 'The "value["quote\\"d"]" argument must not be a function' })
})

test('a byte budget refuses a value as soon as the encoding would pass it', () => {
  const over = (max) => ({
    name: 'RangeError', code: 'ERR_OUT_OF_RANGE',
    message: `The "value" argument must encode to at most ${max} bytes of MessagePack (the maxValueBytes option)`,
  })
  const samples = [0, 'x'.repeat(31), 'ü'.repeat(40), Buffer.alloc(300, 1), Array(20).fill('ab'),
    { a: [1, { b: 'c' }], d: 'é'.repeat(10) }, 2 ** 40, 1.5]
  for (const v of samples) {
    const full = encodeValue(v)
    // At the limit exactly: the same bytes as without one. One byte less: refused.
    assert.equal(encodeValue(v, 'value', full.length, 'maxValueBytes').toString('hex'), full.toString('hex'))
    if (full.length > 1) assert.throws(() => encodeValue(v, 'value', full.length - 1, 'maxValueBytes'), over(full.length - 1))
  }
  // Without a limit name the message names no option.
  assert.throws(() => encodeValue('abc', 'state', 2), { name: 'RangeError', message: 'The "state" argument must encode to at most 2 bytes of MessagePack' })

  // Inputs whose size alone is over the budget are refused before anything is read from them.
  const max = 256 * 1024
  assert.throws(() => encodeValue(new Array(3e8), 'value', max, 'maxValueBytes'), over(max))
  assert.throws(() => encodeValue({ deep: [[new Array(3e8)]] }, 'value', max, 'maxValueBytes'), over(max))
  assert.throws(() => encodeValue('x'.repeat(max), 'value', max, 'maxValueBytes'), over(max))
  assert.throws(() => encodeValue(Buffer.alloc(max), 'value', max, 'maxValueBytes'), over(max))
  let reads = 0
  const countingReads = (array) => new Proxy(array, {
    get(target, property) {
      if (typeof property === 'string' && /^\d+$/.test(property)) reads++
      return Reflect.get(target, property)
    },
  })
  const watched = countingReads(new Array(3e8))
  assert.throws(() => encodeValue(watched, 'value', max, 'maxValueBytes'), over(max))
  assert.equal(reads, 0, 'no element was read')

  // Otherwise the encoder stops at the item that passes the budget: after a 3-byte array16
  // header, 9 items of 10 bytes fit in 100, the tenth does not.
  reads = 0
  const items = countingReads(Array(50).fill('123456789'))
  assert.throws(() => encodeValue(items, 'value', 100, 'maxValueBytes'), over(100))
  assert.equal(reads, 10)
  // Sharing makes a small graph a huge tree: 2 ** 60 leaves, refused at the budget.
  let shared = 'leaf'
  for (let i = 0; i < 60; i++) shared = [shared, shared]
  assert.throws(() => encodeValue(shared, 'value', max, 'maxValueBytes'), over(max))
})

test('cycles throw TypeError', () => {
  const o = { a: {} }
  o.a.back = o
  const a = [1]
  a.push([a])
  for (const v of [o, a]) {
    assert.throws(() => encodeValue(v), {
      name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE', message: 'The "value" argument must not be cyclic',
    })
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
