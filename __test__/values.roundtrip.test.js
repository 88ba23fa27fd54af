'use strict'
// Every kind of value a node can hold arrives deep-equal at a live peer, both as the 'update'
// event's value and through peerValue(). (values.test.js covers the codec on its own.)

const { describe, test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { startCluster, stopAll, waitForEvent } = require('./helpers')

describe('values round-trip between two live nodes', () => {
  let writer
  let reader
  let counter = 0

  before(async () => {
    ;[writer, reader] = await startCluster(2)
  })

  after(async () => {
    await stopAll([writer, reader].filter(Boolean))
  })

  /** Writes `value` under a fresh key; resolves with what the reader got, by event and by query. */
  async function send(value) {
    const key = `key-${++counter}`
    const arrived = waitForEvent(reader, 'update', (peer, k) => peer === writer.peer_name && k === key, 5000)
    writer.setLocalState(key, value)
    const [, , fromEvent] = await arrived
    return { fromEvent, fromQuery: reader.peerValue(writer.peer_name, key), local: writer.getLocalState(key) }
  }

  async function assertRoundTrips(value, expected = value) {
    const { fromEvent, fromQuery, local } = await send(value)
    assert.deepEqual(fromEvent, expected)
    assert.deepEqual(fromQuery, expected)
    assert.deepEqual(local, expected)
  }

  test('strings, including empty, long and non-ASCII ones', async () => {
    for (const s of ['', 'hello', 'héllo wörld ✓', '日本語テキスト', '😀👍🏽 family: 👨‍👩‍👧', 'ü'.repeat(20),
      'x'.repeat(31), 'x'.repeat(32), 'y'.repeat(300), 'z'.repeat(70000), 'nul\u0000inside']) {
      await assertRoundTrips(s)
    }
  })

  test('integers across every msgpack width, up to the safe-integer limits', async () => {
    for (const n of [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, Number.MAX_SAFE_INTEGER,
      -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, Number.MIN_SAFE_INTEGER]) {
      await assertRoundTrips(n)
    }
  })

  test('floats, -0, NaN and the infinities', async () => {
    for (const n of [0.1, -1.5, 3.141592653589793, 1e300, -1e-300, Number.EPSILON, 2 ** 60, NaN, Infinity, -Infinity]) {
      await assertRoundTrips(n)
    }
    const { fromEvent, fromQuery } = await send(-0)
    assert.ok(Object.is(fromEvent, -0), `event value ${fromEvent} is -0`)
    assert.ok(Object.is(fromQuery, -0), `queried value ${fromQuery} is -0`)
  })

  test('booleans and null (undefined arrives as null)', async () => {
    await assertRoundTrips(true)
    await assertRoundTrips(false)
    await assertRoundTrips(null)
    await assertRoundTrips(undefined, null)
  })

  test('arrays, empty to large, mixed and nested', async () => {
    await assertRoundTrips([])
    await assertRoundTrips([1, 'two', null, true, 2.5, [3, [4, [5]]]])
    await assertRoundTrips(Array.from({ length: 16 }, (_, i) => i))
    await assertRoundTrips(Array.from({ length: 5000 }, (_, i) => (i % 2 ? i : `item-${i}`)))
  })

  test('nested objects, unicode keys and a "__proto__" key', async () => {
    await assertRoundTrips({})
    await assertRoundTrips({
      service: { name: 'api', ports: [80, 443], tls: { enabled: true, cert: null } },
      'ключ': 'значение',
      '😀': { deeper: { and: { deeper: [{ x: -1 }] } } },
      weight: 0.75,
    })
    await assertRoundTrips(Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`k${i}`, i])))
    // A null-prototype object arrives as a plain one.
    await assertRoundTrips(Object.assign(Object.create(null), { a: 1, b: 'two' }), { a: 1, b: 'two' })
    const proto = await send(JSON.parse('{"__proto__": {"polluted": true}, "x": 1}'))
    assert.equal(Object.getPrototypeOf(proto.fromEvent), Object.prototype)
    assert.ok(Object.hasOwn(proto.fromEvent, '__proto__'))
    assert.equal(proto.fromEvent.polluted, undefined)
    assert.deepEqual(proto.fromQuery, proto.fromEvent)
  })

  test('Buffers (and other Uint8Arrays, which arrive as Buffers)', async () => {
    for (const n of [0, 1, 255, 256, 70000]) {
      const buffer = Buffer.alloc(n)
      for (let i = 0; i < n; i++) buffer[i] = (i * 31) & 0xff
      await assertRoundTrips(buffer)
    }
    await assertRoundTrips(new Uint8Array([1, 2, 3]), Buffer.from([1, 2, 3]))
    await assertRoundTrips({ blob: Buffer.from('bytes'), list: [Buffer.from([0xc1, 0xff])] })
  })

  test('values with toJSON (Date) arrive as their JSON form', async () => {
    const when = new Date('2024-01-02T03:04:05.678Z')
    await assertRoundTrips(when, when.toISOString())
    await assertRoundTrips({ when }, { when: when.toISOString() })
  })

  test('a value just under maxValueBytes arrives whole', async () => {
    // 256 KiB default limit; a str32 header costs 5 bytes.
    const big = 'v'.repeat(256 * 1024 - 5)
    const { fromEvent, fromQuery } = await send(big)
    assert.equal(fromEvent.length, big.length)
    assert.equal(fromEvent, big)
    assert.equal(fromQuery, big)
  })
})
