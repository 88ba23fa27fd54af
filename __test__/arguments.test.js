'use strict'
// Argument checking: mistakes throw synchronously, as TypeError or RangeError naming the
// argument; start()/stop() misuse and bind failures are reported the Node way.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const { Gossiper } = require('..')
const { FAST, stopAll, waitForMembership } = require('./helpers')

const typeError = (message) => ({ name: 'TypeError', message })
const rangeError = (message) => ({ name: 'RangeError', message })

test('port: out of range or non-integer is a RangeError, a non-number a TypeError', () => {
  for (const port of [-1, 65536, 1.5, Infinity]) {
    assert.throws(() => new Gossiper(port), { ...rangeError(/"port"/), code: 'ERR_OUT_OF_RANGE' }, `port ${port}`)
    assert.throws(() => new Gossiper({ port }), rangeError(/"port"/), `options port ${port}`)
  }
  for (const port of ['9000', null, NaN, true]) {
    assert.throws(() => new Gossiper(port), { ...typeError(/"port"/), code: 'ERR_INVALID_ARG_TYPE' }, `port ${String(port)}`)
  }
  assert.throws(() => new Gossiper({ port: '9000' }), typeError(/"port"/))
})

test('seeds: not an array, or an entry that is not a valid "host:port", is rejected naming it', () => {
  assert.throws(() => new Gossiper(9000, 'localhost:9001'), typeError(/"seeds"/))
  assert.throws(() => new Gossiper(9000, 42), typeError(/"seeds"/))
  assert.throws(() => new Gossiper({ seeds: { 0: '127.0.0.1:9001' } }), typeError(/"seeds"/))
  assert.throws(() => new Gossiper(9000, ['nope']), { ...typeError(/"seeds\[0\]"/), code: 'ERR_INVALID_ARG_VALUE' })
  assert.throws(() => new Gossiper(9000, ['127.0.0.1:9001', 'bad host:1']), typeError(/"seeds\[1\]"/))
  assert.throws(() => new Gossiper(9000, ['host:99999']), { ...rangeError(/"seeds\[0\]"/), code: 'ERR_OUT_OF_RANGE' })
  assert.throws(() => new Gossiper(9000, ['host:0']), rangeError(/"seeds\[0\]"/))
  assert.throws(() => new Gossiper(9000, [42]), { ...typeError(/"seeds\[0\]"/), code: 'ERR_INVALID_ARG_TYPE' })
  assert.throws(() => new Gossiper(9000, ['[not-ipv6]:80']), typeError(/"seeds\[0\]"/))
  // Valid forms construct fine.
  new Gossiper(9000, ['localhost:9001', '127.0.0.1:9002', '[::1]:9003'])
})

test('ip_to_bind: a string that is not an IP address, or a non-string, is a TypeError', () => {
  // The positional ip_to_bind is the "address" option; the message uses that name.
  assert.throws(() => new Gossiper(9000, [], 'not-an-ip'), { ...typeError(/"address".*not-an-ip/), code: 'ERR_INVALID_ARG_VALUE' })
  assert.throws(() => new Gossiper(9000, [], 'localhost'), typeError(/"address"/))
  assert.throws(() => new Gossiper(9000, [], 127001), { ...typeError(/"address"/), code: 'ERR_INVALID_ARG_TYPE' })
  assert.throws(() => new Gossiper({ address: '999.0.0.1' }), typeError(/"address"/))
  new Gossiper(9000, [], '127.0.0.1')
  new Gossiper(9000, [], '::1')
})

test('options: bad gossipInterval, clusterName and limits are rejected naming the option', () => {
  for (const gossipInterval of [0, -5, 3600e3 + 1, Infinity]) {
    assert.throws(() => new Gossiper({ gossipInterval }), rangeError(/"gossipInterval"/), String(gossipInterval))
  }
  for (const gossipInterval of ['fast', NaN, null, {}]) {
    assert.throws(() => new Gossiper({ gossipInterval }), typeError(/"gossipInterval"/), String(gossipInterval))
  }
  for (const clusterName of ['', 42, null, 'x'.repeat(256), ['c']]) {
    assert.throws(() => new Gossiper({ clusterName }), typeError(/"clusterName"/), String(clusterName))
  }
  assert.throws(() => new Gossiper({ maxFrameBytes: 100 }), rangeError(/"maxFrameBytes"/))
  assert.throws(() => new Gossiper({ pushFanout: 1.5 }), rangeError(/"pushFanout"/))
  assert.throws(() => new Gossiper({ maxValueBytes: '1' }), typeError(/"maxValueBytes"/))
  assert.throws(() => new Gossiper({ phiThreshold: 0 }), rangeError(/"phiThreshold"/))
  // Fractional intervals are allowed, and undefined options take their defaults.
  const g = new Gossiper({ gossipInterval: 12.5, clusterName: 'c'.repeat(255), seeds: undefined })
  assert.equal(g.options.gossipInterval, 12.5)
  assert.deepEqual(g.options.seeds, [])
})

test('setLocalState: a bad key or an unencodable value is a TypeError naming it', () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  for (const key of [42, null, undefined, Symbol('k'), { toString: () => 'k' }]) {
    assert.throws(() => g.setLocalState(key, 1), typeError(/"key"/), String(typeof key))
  }
  assert.throws(() => g.setLocalState('', 1), { ...typeError(/"key".*empty/), code: 'ERR_INVALID_ARG_VALUE' })
  assert.throws(() => g.setLocalState('k', () => 1), typeError(/"value".*function/))
  assert.throws(() => g.setLocalState('k', Symbol('v')), typeError(/"value".*symbol/))
  assert.throws(() => g.setLocalState('k', 10n), typeError(/"value".*BigInt/))
  assert.throws(() => g.setLocalState('k', { nested: [1, { fn() {} }] }), {
    ...typeError('The "value.nested[1].fn" argument must not be a function'), code: 'ERR_INVALID_ARG_TYPE',
  })
  const cyclic = { name: 'loop' }
  cyclic.self = { parent: cyclic }
  assert.throws(() => g.setLocalState('k', cyclic), { ...typeError(/"value".*cyclic/), code: 'ERR_INVALID_ARG_VALUE' })
  const cyclicArray = [1]
  cyclicArray.push(cyclicArray)
  assert.throws(() => g.setLocalState('k', cyclicArray), typeError(/"value".*cyclic/))
  // None of the failed writes stored anything.
  assert.equal(g.getLocalState('k'), undefined)
  assert.deepEqual(g.peerKeys(''), [])
})

test('setLocalState: a value over maxValueBytes or a key over maxKeyBytes is a RangeError', () => {
  const g = new Gossiper({ ...FAST, port: 0, maxValueBytes: 64, maxKeyBytes: 8 })
  assert.throws(() => g.setLocalState('k', 'x'.repeat(64)), { ...rangeError(/"value".*maxValueBytes/), code: 'ERR_OUT_OF_RANGE' })
  assert.throws(() => g.setLocalState('k', { list: Array(70).fill(1) }), rangeError(/maxValueBytes/))
  assert.throws(() => g.setLocalState('k'.repeat(9), 1), rangeError(/"key".*maxKeyBytes/))
  // Multi-byte characters count as bytes: 3 × 3 bytes is over 8.
  assert.throws(() => g.setLocalState('€€€', 1), rangeError(/"key"/))
  assert.equal(g.getLocalState('k'), undefined)
  // At the limits exactly, the writes are accepted.
  g.setLocalState('k'.repeat(8), 'x'.repeat(62))
  assert.equal(g.getLocalState('k'.repeat(8)), 'x'.repeat(62))
})

test('setLocalState: values that would not arrive as they are are a TypeError naming the path', () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  const refusedType = (path, what) => ({ ...typeError(new RegExp(`^The "${path}" argument must not be ${what} \\(`)), code: 'ERR_INVALID_ARG_TYPE' })
  assert.throws(() => g.setLocalState('k', { items: [1, 2, 3, new Map()] }), refusedType('value\\.items\\[3\\]', 'a Map'))
  assert.throws(() => g.setLocalState('k', new Set([1])), refusedType('value', 'a Set'))
  assert.throws(() => g.setLocalState('k', { samples: new Float64Array(4) }), refusedType('value\\.samples', 'a Float64Array'))
  assert.throws(() => g.setLocalState('k', [new Uint16Array(1)]), refusedType('value\\[0\\]', 'a Uint16Array'))
  assert.throws(() => g.setLocalState('k', { raw: new ArrayBuffer(8) }), refusedType('value\\.raw', 'an ArrayBuffer'))
  assert.throws(() => g.setLocalState('k', { view: new DataView(new ArrayBuffer(8)) }), refusedType('value\\.view', 'a DataView'))
  assert.throws(() => g.setLocalState('k', { name: new String('a') }), refusedType('value\\.name', 'a boxed String'))
  assert.throws(() => g.setLocalState('k', [[new Number(1)]]), refusedType('value\\[0\\]\\[0\\]', 'a boxed Number'))
  assert.throws(() => g.setLocalState('k', { 'on/off': new Boolean(true) }), refusedType('value\\["on/off"\\]', 'a boxed Boolean'))
  assert.throws(() => g.setLocalState('k', { cause: new Error('boom') }), refusedType('value\\.cause', 'an instance of Error'))
  // Strings with lone surrogates, as values or as keys inside values.
  const badString = (path) => ({ ...typeError(new RegExp(`^The "${path}" argument must not (contain|have a key .*) a lone surrogate`)), code: 'ERR_INVALID_ARG_VALUE' })
  assert.throws(() => g.setLocalState('k', 'x\uD800'), badString('value'))
  assert.throws(() => g.setLocalState('k', { list: ['ok', 'x\uDC00'] }), badString('value\\.list\\[1\\]'))
  assert.throws(() => g.setLocalState('k', { list: [{ 'x\uD800': 1 }] }), badString('value\\.list\\[0\\]'))
  assert.equal(g.getLocalState('k'), undefined, 'nothing was stored')
  // What is carried still is: plain and null-prototype objects, Buffers, Dates through toJSON.
  const value = { bare: Object.assign(Object.create(null), { x: 1 }), bytes: Buffer.from([1]), when: new Date(0) }
  g.setLocalState('k', value)
  assert.deepEqual(g.getLocalState('k'), { bare: { x: 1 }, bytes: Buffer.from([1]), when: '1970-01-01T00:00:00.000Z' })
})

test('setLocalState: a huge value or key is refused by its size before it is encoded', () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  const overValue = { ...rangeError('The "value" argument must encode to at most 262144 bytes of MessagePack (the maxValueBytes option)'), code: 'ERR_OUT_OF_RANGE' }
  // The example: this used to encode 300 MB of nils before the size was checked.
  assert.throws(() => g.setLocalState('k', new Array(3e8)), overValue)
  assert.throws(() => g.setLocalState('k', { nested: [new Array(3e8)] }), overValue)
  assert.throws(() => g.setLocalState('k', 'x'.repeat(1e7)), overValue)
  assert.throws(() => g.setLocalState('k', Buffer.alloc(1e7)), overValue)
  // A value passes the limit part-way: refused all the same.
  assert.throws(() => g.setLocalState('k', Array(1000).fill('x'.repeat(300))), overValue)
  const overKey = { ...rangeError('The "key" argument must be at most 1024 bytes (the maxKeyBytes option)'), code: 'ERR_OUT_OF_RANGE' }
  assert.throws(() => g.setLocalState('k'.repeat(1e7), 1), overKey)
  assert.throws(() => g.setLocalState('\uD800'.repeat(2000), 1), overKey, 'the length is checked before the content')
  assert.throws(() => g.setLocalState('€'.repeat(342), 1), overKey, '1026 bytes of UTF-8')
  assert.equal(g.getLocalState('k'), undefined)
  g.setLocalState('€'.repeat(341), 'x'.repeat(262144 - 5))
  assert.equal(g.getLocalState('€'.repeat(341)).length, 262144 - 5)
})

test('keys and peer names with a lone surrogate are refused, not merged into U+FFFD', () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  const bad = (name) => ({ ...typeError(new RegExp(`^The "${name}" argument must not contain a lone surrogate \\(U\\+D[89A-F][0-9A-F]{2} at index \\d+\\)`)), code: 'ERR_INVALID_ARG_VALUE' })
  g.setLocalState('x\uFFFD', 'replacement')
  for (const key of ['x\uD800', 'x\uDC00', '\uDC00\uD800', 'é'.repeat(40) + '\uDBFF']) {
    assert.throws(() => g.setLocalState(key, 1), bad('key'), JSON.stringify(key))
    assert.throws(() => g.getLocalState(key), bad('key'), JSON.stringify(key))
    assert.throws(() => g.peerValue('127.0.0.1:1', key), bad('key'), JSON.stringify(key))
  }
  assert.equal(g.getLocalState('x\uFFFD'), 'replacement', 'the real U+FFFD key is untouched')
  // Surrogate pairs are fine.
  g.setLocalState('x😀', 'pair')
  assert.equal(g.getLocalState('x😀'), 'pair')
  assert.throws(() => g.peerValue('127.0.0.1:1\uD800', 'k'), bad('peer'))
  assert.throws(() => g.peerKeys('\uDC00127.0.0.1:1'), bad('peer'))
  assert.deepEqual(g.peerKeys('127.0.0.1:1\uFFFD'), [])
})

test('setLocalState options and deleteLocalState: bad arguments are rejected naming them', () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  for (const ttl of [0, -1, 366 * 24 * 3600e3, Infinity]) {
    assert.throws(() => g.setLocalState('k', 1, { ttl }), { ...rangeError(/"options.ttl"/), code: 'ERR_OUT_OF_RANGE' }, String(ttl))
  }
  for (const ttl of ['1000', NaN, null, {}]) {
    assert.throws(() => g.setLocalState('k', 1, { ttl }), { ...typeError(/"options.ttl"/), code: 'ERR_INVALID_ARG_TYPE' }, String(ttl))
  }
  for (const options of [1000, 'ttl', null, [1000]]) {
    assert.throws(() => g.setLocalState('k', 1, options), typeError(/"options"/), String(options))
  }
  assert.throws(() => g.setLocalState('k', 1, { expires: 5 }), { ...typeError(/"expires"/), code: 'ERR_INVALID_ARG_VALUE' })
  assert.equal(g.getLocalState('k'), undefined, 'no write on a refused call')
  g.setLocalState('k', 1, { ttl: 0.5e3 })
  g.setLocalState('k', 2, {})
  g.setLocalState('k', 3, { ttl: undefined })
  assert.equal(g.getLocalState('k'), 3)

  for (const key of [42, null, undefined]) {
    assert.throws(() => g.deleteLocalState(key), typeError(/"key"/), String(key))
  }
  assert.throws(() => g.deleteLocalState(''), { ...typeError(/"key".*empty/), code: 'ERR_INVALID_ARG_VALUE' })
  assert.equal(g.deleteLocalState('k'), true)
  assert.equal(g.deleteLocalState('k'), false)
  assert.equal(g.deleteLocalState('never-set'), false)
  assert.equal(g.getLocalState('k'), undefined)

  for (const tombstoneTtl of [0, 0.5, -1, Infinity]) {
    assert.throws(() => new Gossiper({ tombstoneTtl }), rangeError(/"tombstoneTtl"/), String(tombstoneTtl))
  }
  assert.throws(() => new Gossiper({ tombstoneTtl: '1h' }), typeError(/"tombstoneTtl"/))
  assert.equal(new Gossiper({ tombstoneTtl: 500 }).options.tombstoneTtl, 500)
  assert.equal(new Gossiper().options.tombstoneTtl, 3600e3)
})

test('peer arguments of the readers must be strings', () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  assert.throws(() => g.peerValue(42, 'k'), typeError(/"peer"/))
  assert.throws(() => g.peerValue('127.0.0.1:1', 42), typeError(/"key"/))
  assert.throws(() => g.peerKeys(undefined), typeError(/"peer"/))
  assert.throws(() => g.getLocalState(''), typeError(/"key"/))
})

test('start() twice throws ERR_GOSSIP_RUNNING synchronously; stop() twice is safe', async () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  try {
    await g.start()
    const name = g.peer_name
    assert.match(name, /^127\.0\.0\.1:\d+$/)
    assert.throws(() => g.start(), { name: 'Error', code: 'ERR_GOSSIP_RUNNING' })
    assert.throws(() => g.start(() => assert.fail('callback of a refused start')), { code: 'ERR_GOSSIP_RUNNING' })
    assert.equal(g.peer_name, name)
    await g.stop()
    await g.stop()
    await Promise.all([g.stop(), g.stop()])
    await new Promise((resolve, reject) => g.stop((error) => (error ? reject(error) : resolve())))
    // Stopped for good: starting again is allowed.
    await g.start()
    assert.equal(g.peer_name, name)
  } finally {
    await stopAll([g])
  }
})

test('stop() of a gossiper that never started resolves', async () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  await g.stop()
  await new Promise((resolve, reject) => g.stop((error) => (error ? reject(error) : resolve())))
  assert.equal(g.peer_name, undefined)
})

test('start(callback) and stop(callback) call back with null on success', async () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  try {
    const started = await new Promise((resolve) => {
      const returned = g.start((error) => resolve({ error, nameAtCallback: g.peer_name }))
      assert.ok(returned instanceof Promise)
      assert.match(g.peer_name, /^127\.0\.0\.1:\d+$/, 'peer_name is set synchronously by start()')
    })
    assert.equal(started.error, null)
    const stopped = await new Promise((resolve) => g.stop(resolve))
    assert.equal(stopped, null)
  } finally {
    await stopAll([g])
  }
})

test('binding a port in use rejects with EADDRINUSE and passes the error to the callback', async () => {
  const first = new Gossiper({ ...FAST, port: 0 })
  const second = new Gossiper({ ...FAST, port: 0 })
  try {
    await first.start()
    const port = Number(first.peer_name.split(':')[1])
    const taken = new Gossiper({ port, address: '127.0.0.1', gossipInterval: 50 })
    await assert.rejects(taken.start(), { code: 'EADDRINUSE', port, address: '127.0.0.1' })
    assert.equal(taken.peer_name, undefined)

    const viaCallback = new Gossiper(port, [], '127.0.0.1')
    const error = await new Promise((resolve) => {
      // The returned promise rejects too; the callback saw the error, so that must not be unhandled.
      viaCallback.start(resolve).catch(() => {})
    })
    assert.ok(error instanceof Error)
    assert.equal(error.code, 'EADDRINUSE')

    // A failed start leaves the gossiper stopped: stop() is fine and other nodes are unaffected.
    await taken.stop()
    await viaCallback.stop()
    await second.start()
    assert.notEqual(second.peer_name, first.peer_name)
  } finally {
    await stopAll([first, second])
  }
})

test('start() with a non-function callback throws and leaves the gossiper stopped', async () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  try {
    assert.throws(() => g.start('not a function'), typeError(/"callback"/))
    assert.equal(g.peer_name, undefined, 'no name: the gossiper did not start')
    // With the bug, the gossiper is running: this second start throws ERR_GOSSIP_RUNNING.
    await g.start()
  } finally {
    await stopAll([g])
  }
})

test('unknown option names are refused, naming the option', () => {
  assert.throws(() => new Gossiper({ gossipIntervall: 100 }), { ...typeError(/"gossipIntervall"/), code: 'ERR_INVALID_ARG_VALUE' })
  assert.throws(() => new Gossiper({ port: 0, ip_to_bind: '127.0.0.1' }), typeError(/"ip_to_bind"/))
})

test('a maxValueBytes that one frame could not carry is a RangeError', () => {
  assert.throws(() => new Gossiper({ maxFrameBytes: 65536, maxValueBytes: 65536 }), { ...rangeError(/"maxValueBytes"/), code: 'ERR_OUT_OF_RANGE' })
  new Gossiper({ maxFrameBytes: 1 << 20, maxValueBytes: 512 << 10 })
})

test('the native class checks its options itself: typed errors with codes, never a crash', () => {
  const { NativeGossiper } = require('../gossiper.node')
  const build = (options) => new NativeGossiper(options, () => {})
  const cases = [
    [{ gossipInterval: Infinity }, 'RangeError', 'ERR_OUT_OF_RANGE'],
    [{ gossipInterval: 0 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
    [{ connectTimeout: NaN }, 'TypeError', 'ERR_INVALID_ARG_TYPE'],
    [{ idleTimeout: -1 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
    [{ port: 70000 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
    [{ port: 1.5 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
    [{ maxFrameBytes: 2048, maxValueBytes: 4096 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
    [{ gossipInterval: 'fast' }, 'TypeError', 'ERR_INVALID_ARG_TYPE'],
    [{ seeds: ['nope'] }, 'TypeError', 'ERR_INVALID_ARG_VALUE'],
    [{ seeds: 'a:1' }, 'TypeError', 'ERR_INVALID_ARG_TYPE'],
    [{ address: 'localhost' }, 'TypeError', 'ERR_INVALID_ARG_VALUE'],
    [{ advertise: '10.0.0.1:0' }, 'TypeError', 'ERR_INVALID_ARG_VALUE'],
    [{ clusterName: '' }, 'TypeError', 'ERR_INVALID_ARG_VALUE'],
    [{ surprise: 1 }, 'TypeError', 'ERR_INVALID_ARG_VALUE'],
  ]
  for (const [options, name, code] of cases) {
    assert.throws(() => build(options), { name, code }, JSON.stringify(options))
  }
  build({ port: 0, gossipInterval: 50 })
})

test('advertise names the node for others; 0.0.0.0 and :: listen everywhere and are never a name', async () => {
  const advertised = new Gossiper({ port: 0, address: '127.0.0.1', advertise: '203.0.113.7:17946', gossipInterval: 50 })
  const anyV4 = new Gossiper({ port: 0, address: '0.0.0.0', seeds: ['127.0.0.1:1'], gossipInterval: 50 })
  const anyV6 = new Gossiper({ port: 0, address: '::', seeds: ['127.0.0.1:1'], gossipInterval: 50 })
  try {
    await advertised.start()
    assert.equal(advertised.peer_name, '203.0.113.7:17946')
    await anyV4.start()
    await anyV6.start()
    // Seeds on loopback: a one-host cluster, named on loopback, reachable there.
    assert.match(anyV4.peer_name, /^127\.0\.0\.1:\d+$/)
    assert.match(anyV6.peer_name, /^127\.0\.0\.1:\d+$/)
    assert.throws(() => new Gossiper({ advertise: 'host.example:80' }), { ...typeError(/"advertise"/), code: 'ERR_INVALID_ARG_VALUE' })
  } finally {
    await stopAll([advertised, anyV4, anyV6])
  }
})

test('a seed given as a host name is resolved; the node is named once start() resolves', async () => {
  const seed = new Gossiper({ port: 0, address: '127.0.0.1', gossipInterval: 50 })
  await seed.start()
  const port = seed.peer_name.split(':')[1]
  const g = new Gossiper({ port: 0, seeds: [`localhost:${port}`], gossipInterval: 50 })
  try {
    await g.start()
    assert.match(g.peer_name, /^(127\.0\.0\.1|\[::1\]):\d+$/)
    await waitForMembership([seed, g])
  } finally {
    await stopAll([seed, g])
  }
})
