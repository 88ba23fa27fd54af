'use strict'
// start()/stop() in any order and timing end the same way; nothing is emitted after stop()
// resolves; a restarted gossiper is never collected while it runs.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { Gossiper } = require('..')
const { FAST, startCluster, stopAll, spawnFixture, waitFor, waitForEvent } = require('./helpers')

test('start(); stop(); start() without awaiting ends running, the same way 20 times in a row', async () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  try {
    for (let i = 0; i < 20; i++) {
      const order = []
      const first = g.start().then(() => order.push('start'))
      const stopped = g.stop().then(() => order.push('stop'))
      const again = g.start().then(() => order.push('start again'))
      assert.throws(() => g.start(), { code: 'ERR_GOSSIP_RUNNING' }, 'a start is already queued')
      await Promise.all([first, stopped, again])
      assert.deepEqual(order, ['start', 'stop', 'start again'], `repetition ${i}`)
      assert.equal(g._native.isRunning(), true, `repetition ${i}`)
      assert.match(g.peer_name, /^127\.0\.0\.1:\d+$/)
      await g.stop()
      assert.equal(g._native.isRunning(), false)
    }
  } finally {
    await stopAll([g])
  }
})

test('concurrent stop() calls resolve together, once every task ended and the port is free', async () => {
  const g = new Gossiper({ ...FAST, port: 0 })
  await g.start()
  const port = Number(g.peer_name.split(':')[1])
  const resolved = []
  const stops = [g.stop(), g.stop(), g.stop()].map((p, i) => p.then(() => resolved.push(i)))
  await stops[0]
  // The other two resolve in the same turn: nothing can run between them and the first.
  await Promise.resolve()
  assert.equal(resolved.length, 3)
  assert.equal(g._native.isStopping(), false)
  await new Promise((resolve, reject) => {
    const server = net.createServer().once('error', reject).listen(port, '127.0.0.1', () => server.close(resolve))
  })
  await Promise.all(stops)
})

test('stop(); start() restarts once the stop is over, and stop() after a queued start stops it', async () => {
  const [a, b] = await startCluster(2)
  try {
    const restarted = waitForEvent(a, 'peer_alive', (peer) => peer === b.peer_name, 10000)
    b.stop()
    await b.start()
    await restarted
    assert.throws(() => b.start(), { code: 'ERR_GOSSIP_RUNNING' })
  } finally {
    await stopAll([a, b])
  }
  const c = new Gossiper({ ...FAST, port: 0 })
  c.start()
  c.stop()
  c.start()
  await c.stop()
  assert.equal(c._native.isRunning(), false)
  assert.equal(c._native.isStopping(), false)
})

test('no event is emitted after stop() resolves, until the next start()', async () => {
  const [a, b] = await startCluster(2)
  try {
    let writes = 0
    const writer = setInterval(() => { for (let i = 0; i < 50; i++) b.setLocalState(`k${i}`, ++writes) }, 2)
    await waitForEvent(a, 'update', () => true, 10000)
    await a.stop()
    const late = []
    for (const name of ['update', 'new_peer', 'peer_alive', 'peer_failed']) a.on(name, (...args) => late.push([name, ...args]))
    // Let any batch already on its way arrive: b keeps writing for 20 of its rounds.
    await waitFor(() => writes > 2000, 10000, 'b to keep writing')
    clearInterval(writer)
    assert.deepEqual(late, [])
    await a.start()
    await waitForEvent(a, 'update', () => true, 10000)
  } finally {
    await stopAll([a, b])
  }
})

test('listeners may call back into the gossiper: writes, reads, stop and start', async () => {
  const [a, b] = await startCluster(2)
  try {
    a.on('update', function (peer, key, value) {
      if (key !== 'ping') return
      this.setLocalState('pong', value)
      assert.equal(this.peerValue(peer, key), value)
      if (value === 2) {
        this.stop()
        this.start()
      }
    })
    b.setLocalState('ping', 1)
    await waitFor(() => b.peerValue(a.peer_name, 'pong') === 1, 10000, 'pong 1')
    b.setLocalState('ping', 2)
    await waitFor(() => b.peerValue(a.peer_name, 'pong') === 2 && a._native.isRunning(), 10000, 'pong 2 and a running again')
  } finally {
    await stopAll([a, b])
  }
})

test('a gossiper restarted without awaiting and then dropped is not collected while it runs', async () => {
  const child = spawnFixture('gc-restart.js')
  const report = await child.waitForMessage((m) => 'collected' in m, 20000)
  assert.deepEqual(report, { collected: false, liveAtWatcher: true })
  const { code } = await child.waitForExit(20000)
  assert.equal(code, 0)
})
