'use strict'
// The benchmark scenarios. Each job below runs in a fresh worker process (bench/run.js forks
// one per job), so process-wide figures (CPU, RSS) belong to that job alone:
//   runCluster    N gossipers: membership, propagation, steady (+ stability)
//   runThroughput two gossipers: 200,000 writes on A delivered to B
//   runChurn      two gossipers: a million set/delete cycles on A, twice; memory after each
//   runFailure    19 gossipers + one in a child process (bench/child.js): SIGKILL, then stop()
// A job reports through `emit(result)`: one result per scenario, { scenario, n, status, ... },
// status being 'ok', 'timeout' (a figure hit its bound; the bound is in the result) or
// 'error'. Every wait is bounded; nothing here throws on a timeout.

const path = require('node:path')
const { fork } = require('node:child_process')
const { Gossiper } = require('..')

const HOST = '127.0.0.1'
// A cluster name of this run's own keeps other clusters on this machine out; the child
// process inherits it. BENCH_GOSSIPER_OPTIONS (JSON) adds Gossiper options, e.g. '{"gossipFanout":2}'.
process.env.BENCH_CLUSTER ??= `bench-${process.pid}`
const EXTRA = { clusterName: process.env.BENCH_CLUSTER, ...JSON.parse(process.env.BENCH_GOSSIPER_OPTIONS || '{}') }

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const now = () => performance.now()

// Generous bounds: at least 120 s, more for slow intervals or large clusters.
function bounds(interval, n) {
  return {
    membershipMs: Math.max(120e3, 0.6 * n * interval),
    propagationMs: Math.max(120e3, 120 * interval),
    detectionMs: Math.max(120e3, 120 * interval),
    throughputMs: 120e3,
    churnMs: 300e3,
  }
}

function median(values) {
  if (values.length === 0) return null
  const sorted = [...values].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

// first / median / last of `expected` arrival times, missing ones counting as never (Infinity).
function spread(times, expected) {
  const all = [...times]
  while (all.length < expected) all.push(Infinity)
  all.sort((a, b) => a - b)
  return { first: all[0] ?? null, median: median(all), last: all[all.length - 1] ?? null }
}

const round1 = (x) => (Number.isFinite(x) ? Math.round(x * 10) / 10 : null)
const round3 = (x) => (Number.isFinite(x) ? Math.round(x * 1000) / 1000 : null)
const round4 = (x) => (Number.isFinite(x) ? Math.round(x * 10000) / 10000 : null)
const mb = (bytes) => round1(bytes / 2 ** 20)

// ---------------------------------------------------------------------------------------------
// Cluster helpers

/** Starts n gossipers on loopback, port 0; the first is every other's seed. */
async function startCluster(n, interval) {
  const gossipers = []
  for (let i = 0; i < n; i++) {
    const seeds = i === 0 ? [] : [gossipers[0].peer_name]
    const g = new Gossiper({ ...EXTRA, port: 0, address: HOST, seeds, gossipInterval: interval })
    gossipers.push(g)
    await g.start()
  }
  return gossipers
}

/** Stops every gossiper, waiting at most `timeoutMs`. Resolves { ms, timedOut }. */
async function stopAll(gossipers, timeoutMs = 30e3) {
  const begun = now()
  let timer
  const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(true), timeoutMs) })
  const timedOut = await Promise.race([Promise.allSettled(gossipers.map((g) => g.stop())).then(() => false), timeout])
  clearTimeout(timer)
  return { ms: now() - begun, timedOut }
}

/**
 * Waits until each of `nodes` lists every name of `names` (but its own) in livePeers().
 * Each poll checks at most `perPoll` of the nodes not yet complete, round robin (livePeers() of
 * a 1000-node cluster is 1000 strings: checking every node every poll would load the machine
 * being measured); once none is pending, a pass over all of them confirms. Resolves
 * { ms (since `since`), timedOut, complete (nodes seeing everyone) }.
 */
async function waitMembership(nodes, names, { since, timeoutMs, pollMs = 50, perPoll = 64, extra }) {
  const wanted = new Set(names)
  const sees = (g) => {
    let count = 0
    for (const name of g.livePeers()) if (wanted.has(name) && name !== g.peer_name) count++
    return count === wanted.size - (wanted.has(g.peer_name) ? 1 : 0)
  }
  let pending = [...nodes]
  for (;;) {
    const checked = pending.slice(0, perPoll).filter((g) => !sees(g))
    pending = [...pending.slice(perPoll), ...checked] // unchecked first next time
    if (pending.length === 0) {
      pending = nodes.filter((g) => !sees(g)) // confirm: nobody lost anyone meanwhile
      if (pending.length === 0 && (!extra || (await extra()))) {
        return { ms: now() - since, timedOut: false, complete: nodes.length }
      }
    }
    if (now() - since >= timeoutMs) {
      const complete = nodes.filter(sees).length
      return { ms: now() - since, timedOut: true, complete }
    }
    await sleep(pollMs)
  }
}

/** Resolves true when `promise` settles first, false after `ms`. */
async function within(promise, ms) {
  let timer
  const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(false), ms) })
  const result = await Promise.race([promise.then(() => true), timeout])
  clearTimeout(timer)
  return result
}

function sumStats(gossipers) {
  let bytesSent = 0, messagesSent = 0, connectFailures = 0, rejected = 0
  for (const g of gossipers) {
    const s = g.stats()
    bytesSent += s.bytesSent
    messagesSent += s.messagesSent
    connectFailures += s.connectFailures
    for (const count of Object.values(s.rejected)) rejected += count
  }
  return { bytesSent, messagesSent, connectFailures, rejected }
}

// ---------------------------------------------------------------------------------------------
// Job: N gossipers. Membership, then propagation trials, then the steady window (stability).

async function runCluster(job, emit) {
  const { n, interval, trials, durationS, scenarios } = job
  const want = (name) => scenarios.includes(name)
  const limits = bounds(interval, n)
  const base = { n, interval }

  // Listeners: arrivals of the current propagation trial, and every peer_failed.
  let trial = null
  const failures = [] // { at, observer, peer }
  const alives = []
  const attach = (g, index) => {
    g.on('update', (peer, key) => {
      const t = trial
      if (t !== null && key === t.key && !t.arrivals.has(index)) {
        t.arrivals.set(index, now() - t.writtenAt)
        if (t.arrivals.size === t.expected) t.resolve()
      }
    })
    g.on('peer_failed', (peer) => failures.push({ at: now(), observer: g.peer_name, peer }))
    g.on('peer_alive', (peer) => alives.push({ at: now(), observer: g.peer_name, peer }))
  }

  const begun = now()
  const gossipers = await startCluster(n, interval)
  gossipers.forEach(attach)
  const names = gossipers.map((g) => g.peer_name)

  try {
    // 1. membership
    const m = await waitMembership(gossipers, names, { since: begun, timeoutMs: limits.membershipMs })
    if (want('membership')) {
      emit({
        scenario: 'membership', ...base, status: m.timedOut ? 'timeout' : 'ok',
        seconds: round3(m.ms / 1000), rounds: round1(m.ms / interval),
        nodesComplete: m.complete, timeoutS: limits.membershipMs / 1000,
      })
    }

    // 2. propagation
    if (want('propagation')) {
      const results = []
      for (let k = 0; k < trials; k++) {
        const writerIndex = Math.floor(Math.random() * n)
        const t = { key: `bench-propagation-${k}-${Date.now()}`, arrivals: new Map(), expected: n - 1 }
        const done = new Promise((resolve) => { t.resolve = resolve })
        trial = t
        t.writtenAt = now()
        gossipers[writerIndex].setLocalState(t.key, k)
        const completed = t.expected === 0 || (await within(done, limits.propagationMs))
        trial = null
        const arrivalsMs = [...t.arrivals.values()].sort((a, b) => a - b)
        results.push({ writer: writerIndex, completed, received: arrivalsMs.length, ...spread(arrivalsMs, t.expected), arrivalsMs })
        await sleep(interval / 4) // let relays of this trial settle before the next
      }
      const fig = (which) => median(results.map((r) => r[which]))
      const timedOut = results.filter((r) => !r.completed).length
      emit({
        scenario: 'propagation', ...base, status: timedOut ? 'timeout' : 'ok',
        trials, trialsTimedOut: timedOut, timeoutS: limits.propagationMs / 1000,
        firstMs: round3(fig('first')), medianMs: round3(fig('median')), lastMs: round3(fig('last')),
        firstRounds: round3(fig('first') / interval), medianRounds: round3(fig('median') / interval), lastRounds: round3(fig('last') / interval),
        perTrial: results.map((r) => ({
          writer: r.writer, received: r.received, of: n - 1,
          firstMs: round3(r.first), medianMs: round3(r.median), lastMs: round3(r.last),
          arrivalsMs: r.arrivalsMs.map(round1),
        })),
      })
    }

    // 3. steady state, no writes; 6. stability (peer_failed during the same window)
    if (want('steady') || want('stability')) {
      const windowMs = durationS * 1000
      const rss = [] // [ms into window, bytes]
      const snapshot = () => ({ t: now(), cpu: process.cpuUsage(), stats: sumStats(gossipers), rss: process.memoryUsage().rss })
      const s0 = snapshot()
      rss.push([0, s0.rss])
      const sampler = setInterval(() => rss.push([now() - s0.t, process.memoryUsage().rss]), Math.min(1000, windowMs / 10))
      const failedBefore = failures.length
      const alivesBefore = alives.length
      await sleep(windowMs / 2)
      const s1 = snapshot()
      await sleep(windowMs / 2)
      const s2 = snapshot()
      clearInterval(sampler)
      rss.push([s2.t - s0.t, s2.rss])

      const half = (a, b) => {
        const seconds = (b.t - a.t) / 1000
        const cpuUs = (b.cpu.user - a.cpu.user) + (b.cpu.system - a.cpu.system)
        const inHalf = rss.filter(([t]) => t >= a.t - s0.t && t <= b.t - s0.t).map(([, v]) => v)
        return {
          seconds: round3(seconds),
          cpuCores: round3(cpuUs / 1e6 / seconds),
          bytesPerNodePerSec: round1((b.stats.bytesSent - a.stats.bytesSent) / n / seconds),
          messagesPerNodePerSec: round3((b.stats.messagesSent - a.stats.messagesSent) / n / seconds),
          rssMB: mb(inHalf.reduce((x, y) => x + y, 0) / inHalf.length),
          connectFailures: b.stats.connectFailures - a.stats.connectFailures,
          rejectedFrames: b.stats.rejected - a.stats.rejected,
        }
      }
      const first = half(s0, s1)
      const second = half(s1, s2)
      const ratio = (key) => (first[key] > 0 ? round3(second[key] / first[key]) : null)
      if (want('steady')) {
        emit({
          scenario: 'steady', ...base, status: 'ok', windowS: durationS, first, second,
          ratio: { cpuCores: ratio('cpuCores'), bytesPerNodePerSec: ratio('bytesPerNodePerSec'), rssMB: ratio('rssMB') },
          rssMBStart: mb(s0.rss), rssMBEnd: mb(s2.rss),
        })
      }
      if (want('stability')) {
        const inWindow = failures.slice(failedBefore)
        emit({
          scenario: 'stability', ...base, status: 'ok', windowS: durationS,
          falsePositives: inWindow.length,
          peerAliveEvents: alives.length - alivesBefore,
          examples: inWindow.slice(0, 10).map((f) => ({ atS: round3((f.at - s0.t) / 1000), observer: f.observer, peer: f.peer })),
          peerFailedBeforeWindow: failedBefore,
        })
      }
    }
  } finally {
    const stopped = await stopAll(gossipers)
    emit({ scenario: 'shutdown', ...base, status: stopped.timedOut ? 'timeout' : 'ok', ms: round1(stopped.ms) })
  }
}

// ---------------------------------------------------------------------------------------------
// Job: throughput. A writes `keys` distinct keys in a tight loop; B counts the updates.
// A and B share this process, so B's 'update' events wait in the engine's event queue while
// A's loop holds the JavaScript thread: "updates/s first->last at B" is the rate at which queued
// updates are drained into the listener; "end to end" (keys / time from first write to last
// update) is the figure to compare across builds.

async function runThroughput(job, emit) {
  const { interval, keys } = job
  const limits = bounds(interval, 2)
  const base = { n: 2, interval }
  let peak = process.memoryUsage().rss
  const sampleRss = () => { peak = Math.max(peak, process.memoryUsage().rss) }
  const sampler = setInterval(sampleRss, 100)

  // More keys than the default maxKeysPerPeer (65536): both sides must hold them all.
  const perPeer = { maxKeysPerPeer: Math.max(keys, 65536) }
  const a = new Gossiper({ ...EXTRA, ...perPeer, port: 0, address: HOST, gossipInterval: interval })
  await a.start()
  const b = new Gossiper({ ...EXTRA, ...perPeer, port: 0, address: HOST, seeds: [a.peer_name], gossipInterval: interval })
  await b.start()
  try {
    const m = await waitMembership([a, b], [a.peer_name, b.peer_name], { since: now(), timeoutMs: limits.membershipMs, pollMs: 20 })
    if (m.timedOut) throw new Error(`A and B did not see each other live within ${limits.membershipMs / 1000} s`)

    const seen = new Uint8Array(keys)
    let received = 0, firstAt = null, lastAt = null
    let resolveDone
    const done = new Promise((resolve) => { resolveDone = resolve })
    b.on('update', (peer, key, value) => {
      if (peer !== a.peer_name || !Number.isInteger(value) || value < 0 || value >= keys || seen[value]) return
      seen[value] = 1
      received++
      lastAt = now()
      if (firstAt === null) firstAt = lastAt
      if (received === keys) resolveDone()
    })

    const baselineRss = process.memoryUsage().rss
    const writeStart = now()
    for (let i = 0; i < keys; i++) {
      a.setLocalState(`k${i}`, i)
      if (i % 10000 === 0) sampleRss() // the 100 ms sampler cannot run while this loop holds the thread
    }
    const writeMs = now() - writeStart
    sampleRss()
    const completed = await within(done, limits.throughputMs)
    sampleRss()
    const span = lastAt !== null ? lastAt - firstAt : null
    emit({
      scenario: 'throughput', ...base, status: completed ? 'ok' : 'timeout', timeoutS: limits.throughputMs / 1000,
      keys, received,
      writeLoopMs: round1(writeMs), writesPerSec: Math.round(keys / (writeMs / 1000)),
      firstUpdateMs: round1(firstAt !== null ? firstAt - writeStart : null),
      lastUpdateMs: round1(lastAt !== null ? lastAt - writeStart : null),
      updatesPerSec: span > 0 ? Math.round(received / (span / 1000)) : null,
      endToEndPerSec: lastAt !== null ? Math.round(received / ((lastAt - writeStart) / 1000)) : null,
      baselineRssMB: mb(baselineRss), peakRssMB: mb(peak),
      bytesSentByA: a.stats().bytesSent, pushesSentByA: a.stats().pushesSent,
    })
  } finally {
    clearInterval(sampler)
    const stopped = await stopAll([a, b])
    emit({ scenario: 'shutdown', ...base, status: stopped.timedOut ? 'timeout' : 'ok', ms: round1(stopped.ms) })
  }
}

// ---------------------------------------------------------------------------------------------
// Job: churn. A sets and deletes `cycles` distinct keys (a session that opens and closes), in
// two passes, with tombstoneTtl 1 s; B follows. After each pass, once B's view of A has settled
// (A collected every tombstone and B learned it), RSS is sampled. The same figure after both
// passes means nothing accumulates.

const CHURN_TOMBSTONE_TTL = 1000

async function runChurn(job, emit) {
  const { interval, cycles } = job
  const limits = bounds(interval, 2)
  const base = { n: 2, interval }
  let peak = process.memoryUsage().rss
  const sampleRss = () => { peak = Math.max(peak, process.memoryUsage().rss) }
  // Deletions count against maxKeysPerPeer until collected: a second of churn holds far more than
  // the default allows.
  const options = { ...EXTRA, port: 0, address: HOST, gossipInterval: interval, tombstoneTtl: CHURN_TOMBSTONE_TTL, maxKeysPerPeer: 2 ** 22 }
  const a = new Gossiper(options)
  await a.start()
  const b = new Gossiper({ ...options, seeds: [a.peer_name] })
  await b.start()
  try {
    const m = await waitMembership([a, b], [a.peer_name, b.peer_name], { since: now(), timeoutMs: limits.membershipMs, pollMs: 20 })
    if (m.timedOut) throw new Error(`A and B did not see each other live within ${limits.membershipMs / 1000} s`)
    let deletesAtB = 0
    b.on('delete', (peer) => { if (peer === a.peer_name) deletesAtB++ })
    const viewOfA = () => b.peerDetails().find((d) => d.name === a.peer_name)
    const baselineRss = process.memoryUsage().rss
    const passes = []
    let status = 'ok'
    for (let pass = 0; pass < 2 && status === 'ok'; pass++) {
      peak = process.memoryUsage().rss
      const start = now()
      for (let i = 0; i < cycles; i++) {
        const key = `session-${pass}-${i}`
        a.setLocalState(key, i)
        a.deleteLocalState(key)
        // Let pushes, exchanges and collection run as they would between requests.
        if (i % 10000 === 9999) {
          sampleRss()
          await sleep(0)
        }
      }
      const loopMs = now() - start
      sampleRss()
      // Collection is over once B's view of A (max version, horizon) has stopped moving for a
      // while after the last tombstone expired: every collection takes a version of its own.
      const loopEnd = now()
      const deadline = loopEnd + limits.churnMs
      const quiet = CHURN_TOMBSTONE_TTL + 2 * interval
      let view = viewOfA()
      let lastChange = loopEnd
      for (;;) {
        await sleep(20)
        sampleRss()
        const next = viewOfA()
        if (next?.maxVersion !== view?.maxVersion || next?.horizon !== view?.horizon) lastChange = now()
        view = next
        const settled = now() - lastChange >= quiet && now() - loopEnd >= quiet
        if (settled && view?.horizon > 0 && b.peerKeys(a.peer_name).length === 0) break
        if (now() > deadline) { status = 'timeout'; break }
      }
      passes.push({
        loopMs: round1(loopMs), cyclesPerSec: Math.round(cycles / (loopMs / 1000)),
        collectedAfterMs: round1(lastChange - loopEnd), peakRssMB: mb(peak), rssAfterMB: mb(process.memoryUsage().rss),
      })
    }
    emit({
      scenario: 'churn', ...base, status, timeoutS: limits.churnMs / 1000, cycles, tombstoneTtl: CHURN_TOMBSTONE_TTL,
      baselineRssMB: mb(baselineRss), passes, deletesAtB, bytesSentByA: a.stats().bytesSent,
    })
  } finally {
    const stopped = await stopAll([a, b])
    emit({ scenario: 'shutdown', ...base, status: stopped.timedOut ? 'timeout' : 'ok', ms: round1(stopped.ms) })
  }
}

// ---------------------------------------------------------------------------------------------
// Job: failure detection. 19 gossipers here, the 20th in bench/child.js.

/** Forks bench/child.js; resolves a handle once it reports its name. */
function spawnChild(seed, interval, timeoutMs) {
  const child = fork(path.join(__dirname, 'child.js'), [JSON.stringify({ seed, interval })], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  const waiters = new Set()
  child.on('message', (message) => { for (const waiter of waiters) waiter(message) })
  const next = (type, ms = timeoutMs) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => { waiters.delete(waiter); reject(new Error(`child.js: no '${type}' message within ${ms} ms`)) }, ms)
    const waiter = (message) => {
      if (message.type === type || message.type === 'error') {
        clearTimeout(timer)
        waiters.delete(waiter)
        if (message.type === 'error') reject(new Error(`child.js: ${message.message}`))
        else resolve(message)
      }
    }
    waiters.add(waiter)
    exited.then(({ code, signal }) => {
      if (!waiters.has(waiter)) return
      clearTimeout(timer)
      waiters.delete(waiter)
      reject(new Error(`child.js exited (code ${code}, signal ${signal}) before sending '${type}'`))
    })
  })
  const started = next('started')
  return started.then(({ name }) => ({
    child, name, exited, next,
    status: () => { child.send({ cmd: 'status' }); return next('status', 10e3) },
  }))
}

async function runFailure(job, emit) {
  const { interval, settleIntervals } = job
  const n = 20
  const limits = bounds(interval, n)
  const base = { n, interval }

  let target = null // { name, at, detections: Map(observer -> ms), resolve }
  const otherFailures = []
  const begun = now()
  const observers = await startCluster(n - 1, interval)
  for (const g of observers) {
    g.on('peer_failed', (peer) => {
      const t = target
      if (t !== null && peer === t.name) {
        if (!t.detections.has(g.peer_name)) {
          t.detections.set(g.peer_name, now() - t.at)
          if (t.detections.size === observers.length) t.resolve()
        }
      } else {
        otherFailures.push({ observer: g.peer_name, peer })
      }
    })
  }
  const names = observers.map((g) => g.peer_name)
  const children = []
  try {
    const m = await waitMembership(observers, names, { since: begun, timeoutMs: limits.membershipMs })
    if (m.timedOut) throw new Error(`the 19 in-process gossipers did not converge within ${limits.membershipMs / 1000} s`)

    for (const mode of ['kill', 'stop']) {
      const result = { scenario: 'failure', mode, ...base, observers: observers.length, timeoutS: limits.detectionMs / 1000 }
      try {
        const joinBegun = now()
        const node = await spawnChild(names[0], interval, 30e3)
        children.push(node)
        const childSeesAll = async () => {
          const { live } = await node.status()
          return names.every((name) => live.includes(name))
        }
        const joined = await waitMembership(observers, [...names, node.name], { since: joinBegun, timeoutMs: limits.membershipMs, extra: childSeesAll })
        if (joined.timedOut) throw new Error(`child ${node.name} and the 19 did not all see each other within ${limits.membershipMs / 1000} s`)
        result.joinSeconds = round3(joined.ms / 1000)
        result.settleMs = settleIntervals * interval
        await sleep(result.settleMs) // let the detectors sample a few heartbeats of the newcomer
        const otherBefore = otherFailures.length

        const t = { name: node.name, detections: new Map() }
        const detected = new Promise((resolve) => { t.resolve = resolve })
        target = t
        t.at = now()
        if (mode === 'kill') {
          node.child.kill('SIGKILL')
        } else {
          node.child.send({ cmd: 'stop' })
          node.next('stopped', limits.detectionMs).then((m2) => { result.childStopMs = round1(m2.ms) }, () => {})
        }
        const completed = await within(detected, limits.detectionMs)
        target = null
        const times = [...t.detections.values()]
        const s = spread(times, observers.length)
        Object.assign(result, {
          status: completed ? 'ok' : 'timeout', detected: times.length,
          firstS: round4(s.first / 1000), medianS: round4(s.median / 1000), lastS: round4(s.last / 1000),
          firstRounds: round3(s.first / interval), medianRounds: round3(s.median / interval), lastRounds: round3(s.last / interval),
          otherPeerFailed: otherFailures.length - otherBefore,
        })
        const exit = await within(node.exited, 10e3)
        if (!exit) result.note = 'child did not exit within 10 s'
      } catch (error) {
        Object.assign(result, { status: 'error', error: error.message })
      }
      emit(result)
    }
  } finally {
    for (const { child } of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    const stopped = await stopAll(observers)
    emit({ scenario: 'shutdown', ...base, status: stopped.timedOut ? 'timeout' : 'ok', ms: round1(stopped.ms) })
  }
}

module.exports = { runCluster, runThroughput, runChurn, runFailure, bounds }
