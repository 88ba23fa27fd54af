'use strict'
// Gossipers in child processes (scripts under fixtures/): process lifetime, exits, crash-restart
// on the same port, and a blocked JavaScript thread.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const { Gossiper } = require('..')
const { FAST, startCluster, stopAll, waitFor, waitForEvent, waitRounds, record, freePort, spawnFixture } = require('./helpers')

test('a child that stops its only gossiper exits by itself with code 0', async () => {
  const parent = new Gossiper({ ...FAST, port: 0 })
  await parent.start()
  const child = spawnFixture('stop-self.js', [parent.peer_name])
  try {
    const { name } = await child.waitForMessage((m) => m.event === 'started')
    await child.waitForMessage((m) => m.event === 'stopped')
    const { code, signal, stderr, stdout } = await child.waitForExit(10000)
    assert.equal(signal, null)
    assert.equal(code, 0, stderr)
    assert.equal(stderr, '')
    assert.match(stdout, /"joined".*\n.*"stopped"/)
    // The parent heard of the child and of its departure (announced by stop(), or else found by
    // the failure detector): it does not list the child as live.
    await waitFor(() => parent.deadPeers().includes(name), 10000,
      () => `${name} among the parent's dead peers; live: ${parent.livePeers()}, dead: ${parent.deadPeers()}`)
  } finally {
    await child.kill()
    await stopAll([parent])
  }
})

for (const mode of ['idle', 'busy', 'stopping']) {
  test(`process.exit(0) with running gossipers exits cleanly (${mode})`, async () => {
    const parent = new Gossiper({ ...FAST, port: 0 })
    await parent.start()
    const child = spawnFixture('exit-running.js', [mode, parent.peer_name])
    try {
      await child.waitForMessage((m) => m.event === 'ready')
      const { code, signal, stderr } = await child.waitForExit(10000)
      assert.equal(signal, null, `killed by ${signal}; stderr: ${stderr}`)
      assert.equal(code, 0, stderr)
      assert.equal(stderr, '', 'no crash output')
    } finally {
      await child.kill()
      await stopAll([parent])
    }
  })
}

test('a node killed and restarted on the same port wins with its new value, for good', async () => {
  // Two nodes in this process, so the old incarnation's state can also come back by relay.
  const events = new Map()
  const parents = await startCluster(2, {}, { beforeStart: (g) => events.set(g, record(g)) })
  const port = await freePort()
  const name = `127.0.0.1:${port}`
  const options = (value) => JSON.stringify({ port, seed: parents[0].peer_name, key: 'v', value })
  let first
  let second
  try {
    first = spawnFixture('node.js', [options('old')])
    assert.equal((await first.waitForMessage((m) => m.event === 'started')).name, name)
    await waitFor(() => parents.every((g) => g.peerValue(name, 'v') === 'old'), 10000, "'old' to reach both parents")
    const oldGeneration = parents[0].peerDetails().find((d) => d.name === name).generation

    await first.kill()
    assert.equal(first.child.signalCode, 'SIGKILL')

    second = spawnFixture('node.js', [options('new')])
    const started = await second.waitForMessage((m) => m.event === 'started' || m.event === 'error')
    assert.equal(started.event, 'started', `the restart could not bind: ${JSON.stringify(started)}`)
    assert.equal(started.name, name)
    await waitFor(() => parents.every((g) => g.peerValue(name, 'v') === 'new'), 10000,
      () => `'new' to reach both parents; they hold ${parents.map((g) => g.peerValue(name, 'v'))}`)

    // Many more rounds of the restarted node: 'new' stays, 'old' never comes back.
    for (const g of parents) {
      await waitRounds(g, name, 15)
      assert.equal(g.peerValue(name, 'v'), 'new')
      // One update per incarnation's write, in order: nothing of the old incarnation after 'new'.
      const updates = events.get(g).filter(([kind, peer]) => kind === 'update' && peer === name)
      assert.deepEqual(updates.map(([, , key, value]) => [key, value]), [['v', 'old'], ['v', 'new']], `updates on ${g.peer_name}`)
      const detail = g.peerDetails().find((d) => d.name === name)
      assert.ok(detail.generation > oldGeneration, 'the restart runs under a newer generation')
      assert.equal(detail.live, true)
    }
  } finally {
    await Promise.all([first?.kill(), second?.kill()])
    await stopAll(parents)
  }
})

test('a child whose event loop is blocked for 3 s is not declared failed, and its later write arrives', async () => {
  // gossipInterval 100 ms: 3 s is 30 intervals, well past the ~18 silent intervals phi needs.
  const parent = new Gossiper({ ...FAST, port: 0, gossipInterval: 100 })
  const failures = []
  parent.on('peer_failed', (peer) => failures.push(peer))
  await parent.start()
  const child = spawnFixture('block.js', [parent.peer_name, 3000], { stdin: 'pipe' })
  try {
    const { name } = await child.waitForMessage((m) => m.event === 'started')
    await waitFor(() => parent.peerValue(name, 'phase') === 'before', 10000, "the child's 'before'")
    await child.waitForMessage((m) => m.event === 'joined')

    const after = waitForEvent(parent, 'update', (peer, key, value) => peer === name && value === 'after', 10000)
    child.child.stdin.write('block\n')
    await child.waitForMessage((m) => m.event === 'blocking')
    const blockedAt = Date.now()
    await child.waitForMessage((m) => m.event === 'unblocked', 10000)
    assert.ok(Date.now() - blockedAt >= 2500, 'the child really blocked')
    await after
    await waitRounds(parent, name, 10)

    assert.deepEqual(failures, [])
    assert.deepEqual(parent.livePeers(), [name])
    assert.equal(parent.peerValue(name, 'phase'), 'after')
  } finally {
    await child.kill()
    await stopAll([parent])
  }
})
