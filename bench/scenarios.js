'use strict'
// The benchmark scenarios. Each job below runs in a fresh worker process (bench/run.js forks
// one per job), so process-wide figures (CPU, RSS) belong to that job alone:
//   runCluster    N gossipers: membership, s1, propagation, steady, stability, join failures;
//                 or, for the join-storm scenario, all started at once and the join figures
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

/**
 * Starts n gossipers on loopback, port 0; the first is every other's seed. `attach(g, i)` runs
 * before each start, so that no event is missed. One after another by default; with `storm`,
 * the seed first and then all the others at once, as when a whole service starts together.
 * Resolves { gossipers, lastStartAt }.
 */
async function startCluster(n, interval, { storm = false, attach = () => {} } = {}) {
  const gossipers = []
  const make = (i) => {
    const seeds = i === 0 ? [] : [gossipers[0].peer_name]
    const g = new Gossiper({ ...EXTRA, port: 0, address: HOST, seeds, gossipInterval: interval })
    gossipers.push(g)
    attach(g, i)
    return g
  }
  await make(0).start()
  if (storm) {
    const rest = []
    for (let i = 1; i < n; i++) rest.push(make(i))
    await Promise.all(rest.map((g) => g.start()))
  } else {
    for (let i = 1; i < n; i++) await make(i).start()
  }
  return { gossipers, lastStartAt: now() }
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
 * being measured); once none is pending, a pass over all of them confirms. With `ready` (a
 * cheap test, e.g. counts kept from events), nodes are only polled once it holds. Resolves
 * { ms (since `since`), timedOut, complete (nodes seeing everyone) }.
 */
async function waitMembership(nodes, names, { since, timeoutMs, pollMs = 50, perPoll = 64, extra, ready = () => true, incomplete }) {
  const wanted = new Set(names)
  const sees = (g) => {
    let count = 0
    for (const name of g.livePeers()) if (wanted.has(name) && name !== g.peer_name) count++
    return count === wanted.size - (wanted.has(g.peer_name) ? 1 : 0)
  }
  // Every 10 s while waiting, what a node not yet complete lacks: a peer unknown, or known but
  // failed. Progress goes to stderr.
  let nextReport = now() + 10e3
  const report = (g) => {
    const known = new Set(g.allPeers())
    const live = new Set(g.livePeers())
    const missing = names.filter((name) => name !== g.peer_name && !live.has(name))
    const failed = missing.filter((name) => known.has(name)).length
    process.stderr.write(`[waiting ${((now() - since) / 1000).toFixed(1)} s] ` +
      `${g.peer_name} lacks ${missing.length} (${missing.length - failed} unknown, ${failed} failed)\n`)
  }
  let pending = [...nodes]
  for (;;) {
    if (now() >= nextReport && pending.length > 0) {
      nextReport = now() + 10e3
      report((incomplete && incomplete()) || pending[0])
    }
    if (!ready()) {
      if (now() - since >= timeoutMs) return { ms: now() - since, timedOut: true, complete: nodes.filter(sees).length }
      await sleep(pollMs)
      continue
    }
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
  const reasons = {}
  for (const g of gossipers) {
    const s = g.stats()
    bytesSent += s.bytesSent
    messagesSent += s.messagesSent
    connectFailures += s.connectFailures
    for (const [reason, count] of Object.entries(s.rejected)) {
      rejected += count
      reasons[reason] = (reasons[reason] ?? 0) + count
    }
  }
  return { bytesSent, messagesSent, connectFailures, rejected, reasons }
}

/** Frames dropped between two `sumStats`, by reason, the reasons that dropped none left out. */
function rejectedBetween(a, b) {
  return Object.fromEntries(Object.entries(b.reasons ?? {})
    .map(([reason, count]) => [reason, count - (a.reasons?.[reason] ?? 0)])
    .filter(([, count]) => count > 0))
}

// ---------------------------------------------------------------------------------------------
// Job: N gossipers. Membership and the s1 write (both timed from the first start), then
// propagation trials, then the steady window (stability). With `job.storm` (the join-storm
// scenario) every node but the seed starts at once, and the job ends after the join figures.

// The original s1 simulation: one write by the last node started, 10 s after the first start,
// whether or not the cluster has formed yet.
const S1_WRITE_AFTER_MS = 10e3

async function runCluster(job, emit) {
  const { n, interval, trials, durationS, scenarios, storm = false } = job
  const want = (name) => scenarios.includes(name)
  const limits = bounds(interval, n)
  const base = { n, interval }

  // Listeners: arrivals of the current write (an s1 or propagation trial), and every
  // peer_failed. Every node stays up throughout, so every peer_failed is a false one.
  let trial = null
  const failures = [] // { at, observer, peer }
  const alives = []
  // How many live peers each node has, as its events tell (a new peer is live, and failed and
  // alive alternate), so that waiting for membership costs nothing until every node counts
  // n - 1; livePeers() then confirms.
  const liveCounts = new Int32Array(n)
  let nodesSeeingAll = 0
  const countLive = (index, change) => {
    const before = liveCounts[index]
    liveCounts[index] += change
    nodesSeeingAll += (before + change === n - 1) - (before === n - 1)
  }
  const attach = (g, index) => {
    g.on('new_peer', () => countLive(index, 1))
    g.on('peer_alive', () => countLive(index, 1))
    g.on('peer_failed', () => countLive(index, -1))
    g.on('update', (peer, key) => {
      const t = trial
      if (t !== null && key === t.key && !t.arrivals.has(index)) {
        t.arrivals.set(index, now() - t.writtenAt)
        if (t.arrivals.size === t.expected) t.resolve()
      }
    })
    g.on('peer_failed', (peer) => failures.push({ at: now(), observer: index, peer }))
    g.on('peer_alive', (peer) => alives.push({ at: now(), observer: index, peer }))
  }
  /** Writes `key` on `writer` and resolves the arrivals once all others have it, or at `ms`. */
  const timedWrite = async (writerIndex, key, value, ms) => {
    const t = { key, arrivals: new Map(), expected: n - 1 }
    const done = new Promise((resolve) => { t.resolve = resolve })
    trial = t
    t.writtenAt = now()
    gossipers[writerIndex].setLocalState(key, value)
    const completed = t.expected === 0 || (await within(done, ms))
    trial = null
    const arrivalsMs = [...t.arrivals.values()].sort((x, y) => x - y)
    return { writer: writerIndex, completed, received: arrivalsMs.length, ...spread(arrivalsMs, t.expected), arrivalsMs }
  }
  const snapshot = () => ({ t: now(), cpu: process.cpuUsage(), stats: sumStats(gossipers), rss: process.memoryUsage().rss })
  const usage = (a, b) => {
    const seconds = (b.t - a.t) / 1000
    return {
      seconds: round3(seconds),
      cpuCores: round3(((b.cpu.user - a.cpu.user) + (b.cpu.system - a.cpu.system)) / 1e6 / seconds),
      bytesPerNodePerSec: round1((b.stats.bytesSent - a.stats.bytesSent) / n / seconds),
      messagesPerNodePerSec: round3((b.stats.messagesSent - a.stats.messagesSent) / n / seconds),
      connectFailures: b.stats.connectFailures - (a.stats.connectFailures ?? 0),
      rejected: rejectedBetween(a.stats, b.stats),
    }
  }

  let gossipers = []
  const begun = now()
  const atStart = { t: begun, cpu: process.cpuUsage(), stats: { bytesSent: 0, messagesSent: 0 }, rss: process.memoryUsage().rss }
  let peakRss = atStart.rss
  const rssSampler = setInterval(() => { peakRss = Math.max(peakRss, process.memoryUsage().rss) }, 250)
  // s1: armed before the first start, so the write happens 10 s after it however long starting takes.
  let s1 = null
  const s1Wanted = want('s1') && !storm
  const s1Timer = s1Wanted && setTimeout(() => {
    s1 = (async () => {
      while (gossipers.length < n) await sleep(10) // still starting: the last one writes once up
      return { ...(await timedWrite(n - 1, `hi-${Date.now()}`, 's1', limits.propagationMs)), writtenAtS: (now() - begun) / 1000 }
    })()
  }, S1_WRITE_AFTER_MS)
  const started = await startCluster(n, interval, { storm, attach })
  gossipers = started.gossipers
  const startSeconds = (started.lastStartAt - begun) / 1000
  const names = gossipers.map((g) => g.peer_name)

  try {
    // 1. membership, from the first start and from the last
    const m = await waitMembership(gossipers, names, {
      since: begun, timeoutMs: limits.membershipMs,
      ready: () => nodesSeeingAll === n, incomplete: () => gossipers[liveCounts.findIndex((count) => count !== n - 1)],
    })
    const atMembership = snapshot()
    const failedUntilMembership = failures.length
    const membership = {
      status: m.timedOut ? 'timeout' : 'ok',
      seconds: round3(m.ms / 1000), rounds: round1(m.ms / interval),
      secondsAfterLastStart: round3(m.ms / 1000 - startSeconds), startSeconds: round3(startSeconds),
      nodesComplete: m.complete, timeoutS: limits.membershipMs / 1000,
    }
    if (storm) {
      // The join storm's figures: membership, what joining cost, and false failures until
      // 10 rounds after membership (a flapping cluster keeps failing nodes after it formed).
      await sleep(10 * interval)
      clearInterval(rssSampler)
      emit({
        scenario: 'join-storm', ...base, ...membership,
        falseFailures: failures.length, falseFailuresUntilMembership: failedUntilMembership,
        settleS: 10 * interval / 1000,
        examples: failures.slice(0, 10).map((f) => ({ atS: round3((f.at - begun) / 1000), observer: names[f.observer], peer: f.peer })),
        join: usage(atStart, atMembership), peakRssMB: mb(peakRss),
      })
      return
    }
    if (want('membership')) {
      emit({ scenario: 'membership', ...base, ...membership, join: usage(atStart, atMembership), peakRssMB: mb(peakRss) })
    }

    // s1: the write 10 s after the first start
    if (s1Wanted) {
      while (s1 === null) await sleep(50)
      const r = await s1
      emit({
        scenario: 's1', ...base, status: r.completed ? 'ok' : 'timeout', timeoutS: limits.propagationMs / 1000,
        writtenAtS: round3(r.writtenAtS), received: r.received, of: n - 1,
        firstMs: round3(r.first), medianMs: round3(r.median), lastMs: round3(r.last),
        arrivalsMs: r.arrivalsMs.map(round1),
      })
    }
    clearInterval(rssSampler)

    // 2. propagation
    if (want('propagation')) {
      const results = []
      for (let k = 0; k < trials; k++) {
        results.push(await timedWrite(Math.floor(Math.random() * n), `bench-propagation-${k}-${Date.now()}`, k, limits.propagationMs))
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
          rssMBStart: mb(s0.rss), rssMBEnd: mb(s2.rss), rssMBBeforeFirstStart: mb(atStart.rss),
        })
      }
      if (want('stability')) {
        const inWindow = failures.slice(failedBefore)
        emit({
          scenario: 'stability', ...base, status: 'ok', windowS: durationS,
          falsePositives: inWindow.length,
          peerAliveEvents: alives.length - alivesBefore,
          examples: inWindow.slice(0, 10).map((f) => ({ atS: round3((f.at - s0.t) / 1000), observer: names[f.observer], peer: f.peer })),
          peerFailedBeforeWindow: failedBefore,
        })
        // Joining is when a cluster is weakest: its false failures are a figure of their own.
        const joining = failures.slice(0, failedBefore)
        emit({
          scenario: 'join-failures', ...base, status: 'ok', falseFailures: failedBefore,
          untilMembership: failedUntilMembership, untilS: round3((s0.t - begun) / 1000),
          observers: new Set(joining.map((f) => f.observer)).size, peers: new Set(joining.map((f) => f.peer)).size,
          examples: joining.slice(0, 10).map((f) => ({ atS: round3((f.at - begun) / 1000), observer: names[f.observer], peer: f.peer })),
        })
      }
    }
  } finally {
    clearInterval(rssSampler)
    clearTimeout(s1Timer)
    if (s1 !== null) await s1
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
  const { gossipers: observers } = await startCluster(n - 1, interval)
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
