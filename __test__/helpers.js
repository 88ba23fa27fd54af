'use strict'
// Shared helpers for the integration tests. Every wait is bounded and fails with a message
// saying what it was waiting for; nothing here sleeps and hopes.

const net = require('node:net')
const path = require('node:path')
const { spawn } = require('node:child_process')
const { Gossiper } = require('..')

const POLL_MS = 20

// Short intervals keep the suite fast; phi still needs ~18 silent intervals to convict.
const FAST = Object.freeze({ gossipInterval: 50, address: '127.0.0.1' })

/**
 * Polls `predicate` every 20 ms until it returns a truthy value (which is returned), or fails
 * after `timeoutMs` with `message` (a string or a function returning one, for current state).
 */
async function waitFor(predicate, timeoutMs = 5000, message = 'condition') {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const result = await predicate()
    if (result) return result
    if (Date.now() >= deadline) {
      const what = typeof message === 'function' ? message() : message
      throw new Error(`waitFor timed out after ${timeoutMs} ms: ${what}`)
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS))
  }
}

/** Resolves with the event's arguments (an array) once `predicate(...args)` holds. */
function waitForEvent(emitter, name, predicate = () => true, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const onEvent = (...args) => {
      let matched
      try {
        matched = predicate(...args)
      } catch (error) {
        cleanup()
        reject(error)
        return
      }
      if (matched) {
        cleanup()
        resolve(args)
      }
    }
    const timer = setTimeout(() => {
      cleanup()
      reject(new Error(`waitForEvent timed out after ${timeoutMs} ms waiting for '${name}'`))
    }, timeoutMs)
    function cleanup() {
      clearTimeout(timer)
      emitter.off(name, onEvent)
    }
    emitter.on(name, onEvent)
  })
}

/**
 * Waits until `observer` has seen `peer`'s heartbeat rise by `n`: at least n gossip rounds of
 * `peer` have passed and reached `observer`. For "nothing else happens meanwhile" assertions.
 */
async function waitRounds(observer, peer, n, timeoutMs = 10000) {
  const heartbeat = () => observer.peerDetails().find((d) => d.name === peer)?.heartbeat ?? -1
  const start = heartbeat()
  if (start < 0) throw new Error(`${observer.peer_name} does not know ${peer}`)
  await waitFor(() => heartbeat() >= start + n, timeoutMs,
    () => `${observer.peer_name} to see ${n} more heartbeats of ${peer} (from ${start}, now ${heartbeat()})`)
}

/**
 * Starts `n` gossipers on 127.0.0.1 port 0, the first being every other's seed, and waits until
 * each sees all the others live. `beforeStart(g, i)` runs right after each constructor.
 */
async function startCluster(n, options = {}, { beforeStart, timeoutMs = 10000 } = {}) {
  const gossipers = []
  try {
    for (let i = 0; i < n; i++) {
      const seeds = i === 0 ? [] : [gossipers[0].peer_name]
      const g = new Gossiper({ ...FAST, ...options, port: 0, seeds })
      gossipers.push(g)
      if (beforeStart) beforeStart(g, i)
      await g.start()
    }
    await waitForMembership(gossipers, timeoutMs)
  } catch (error) {
    await stopAll(gossipers)
    throw error
  }
  return gossipers
}

/** Waits until every gossiper lists every other one as live. */
function waitForMembership(gossipers, timeoutMs = 10000) {
  const names = gossipers.map((g) => g.peer_name)
  const complete = () => gossipers.every((g) => {
    const live = g.livePeers()
    return names.every((name) => name === g.peer_name || live.includes(name))
  })
  return waitFor(complete, timeoutMs, () =>
    'full membership: ' + gossipers.map((g) => `${g.peer_name} sees [${g.livePeers().join(', ')}]`).join('; '))
}

/** Stops every gossiper; never throws, never waits longer than `timeoutMs`. */
async function stopAll(gossipers, timeoutMs = 10000) {
  let timer
  const timeout = new Promise((resolve) => { timer = setTimeout(resolve, timeoutMs) })
  await Promise.race([Promise.allSettled(gossipers.map((g) => g.stop())), timeout])
  clearTimeout(timer)
}

/** Records every event of a gossiper, in order, as [name, ...args]. */
function record(gossiper) {
  const events = []
  for (const name of ['update', 'delete', 'new_peer', 'peer_alive', 'peer_failed']) {
    gossiper.on(name, (...args) => events.push([name, ...args]))
  }
  return events
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

/**
 * Runs `__test__/fixtures/<script>` with node. The child reports by writing JSON lines to stdout;
 * `waitForMessage(predicate)` waits for one, `exited` resolves with { code, signal }.
 */
function spawnFixture(script, args = [], { stdin = 'ignore' } = {}) {
  const child = spawn(process.execPath, [path.join(__dirname, 'fixtures', script), ...args.map(String)], {
    stdio: [stdin, 'pipe', 'pipe'],
  })
  const messages = []
  const waiters = new Set()
  let stdout = ''
  let stderr = ''
  let pending = ''
  child.stdout.setEncoding('utf8')
  child.stderr.setEncoding('utf8')
  child.stdout.on('data', (chunk) => {
    stdout += chunk
    pending += chunk
    let newline
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline)
      pending = pending.slice(newline + 1)
      let message
      try {
        message = JSON.parse(line)
      } catch {
        continue
      }
      messages.push(message)
      for (const waiter of waiters) waiter(message)
    }
  })
  child.stderr.on('data', (chunk) => { stderr += chunk })
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }))
  })
  // 'close' also waits for stdout/stderr to be drained.
  const closed = new Promise((resolve) => child.once('close', resolve))

  function waitForMessage(predicate, timeoutMs = 10000) {
    const seen = messages.find(predicate)
    if (seen) return Promise.resolve(seen)
    return new Promise((resolve, reject) => {
      const waiter = (message) => {
        if (predicate(message)) {
          finish()
          resolve(message)
        }
      }
      const onExit = ({ code, signal }) => {
        finish()
        reject(new Error(`${script} exited (code ${code}, signal ${signal}) before the awaited message; stderr: ${stderr}`))
      }
      const timer = setTimeout(() => {
        finish()
        reject(new Error(`${script}: no matching message within ${timeoutMs} ms; stdout: ${stdout} stderr: ${stderr}`))
      }, timeoutMs)
      let done = false
      function finish() {
        done = true
        clearTimeout(timer)
        waiters.delete(waiter)
      }
      waiters.add(waiter)
      exited.then((outcome) => { if (!done) onExit(outcome) })
    })
  }

  /** Resolves with { code, signal, stdout, stderr }, or rejects after `timeoutMs`. */
  async function waitForExit(timeoutMs = 10000) {
    let timer
    const timeout = new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`${script} did not exit within ${timeoutMs} ms; stderr: ${stderr}`)), timeoutMs)
    })
    try {
      const outcome = await Promise.race([exited, timeout])
      await Promise.race([closed, timeout])
      return { ...outcome, stdout, stderr }
    } finally {
      clearTimeout(timer)
    }
  }

  /** SIGKILLs the child if it still runs, and waits for it to be gone. */
  async function kill() {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    await waitForExit(10000).catch(() => {})
  }

  return { child, messages, waitForMessage, waitForExit, kill, get stderr() { return stderr } }
}

module.exports = {
  FAST,
  waitFor,
  waitForEvent,
  waitForMembership,
  waitRounds,
  startCluster,
  stopAll,
  record,
  freePort,
  spawnFixture,
}
