'use strict'
// Benchmark harness: gossipers on loopback, one Node process per job.
//
//   node bench/run.js [--preset quick|full] [--n 20,100] [--interval ms] [--duration s]
//                     [--trials k] [--scenarios membership,s1,propagation,steady,stability,
//                     throughput,churn,failure,join-storm] [--svg dir] [--markdown] [--smoke]
//
// Each job runs in a fresh worker process (this file, forked with --worker): one job per N
// (membership, s1, propagation, steady, stability and join failures), one per N for join-storm
// (every node started at once), one each for throughput, churn and failure. Process-wide
// figures (CPU, RSS) then belong to one job, and a job that hangs is killed without taking the
// rest down. Jobs run one after another. Results stream out as `BENCH {json}` lines on stdout;
// a table follows at the end. Progress goes to stderr.
//
// --smoke (CI): the quick preset with tiny durations, a 250 ms interval (so that failure
// detection takes seconds) and one trial. It asserts only that every scenario completed: exit
// code 1 if a scenario threw or timed out or a worker did not exit by itself, never a timing.

const path = require('node:path')
const fs = require('node:fs')
const { fork } = require('node:child_process')

const ALL_SCENARIOS = ['membership', 's1', 'propagation', 'steady', 'throughput', 'churn', 'failure', 'stability', 'join-storm']
const CLUSTER_SCENARIOS = ['membership', 's1', 'propagation', 'steady', 'stability']
// What each cluster scenario reports: stability also reports the false failures while joining.
const REPORTS = { stability: ['stability', 'join-failures'] }

const PRESETS = {
  quick: { ns: [20, 100], durationS: 10, trials: 3, interval: 1000, keys: 200000, cycles: 1e6, settleIntervals: 2 },
  full: { ns: [20, 100, 300, 1000], durationS: 60, trials: 3, interval: 1000, keys: 200000, cycles: 1e6, settleIntervals: 10 },
  smoke: { ns: [20, 100], durationS: 2, trials: 1, interval: 250, keys: 200000, cycles: 2e4, settleIntervals: 2 },
}

const USAGE = `usage: node bench/run.js [--preset quick|full] [--n 20,100] [--interval ms] [--duration s]
                         [--trials k] [--scenarios ${ALL_SCENARIOS.join(',')}] [--svg dir] [--markdown] [--smoke]`

// ---------------------------------------------------------------------------------------------
// Command line

function parseArgs(argv) {
  const given = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`)
      return argv[++i]
    }
    const positive = (text, name) => {
      const number = Number(text)
      if (!Number.isFinite(number) || number <= 0) throw new Error(`${name} must be a positive number, got '${text}'`)
      return number
    }
    switch (arg) {
      case '--preset': given.preset = value(); break
      case '--smoke': given.smoke = true; break
      case '--n': given.ns = value().split(',').map((s) => positive(s, '--n')).map(Math.round); break
      case '--interval': given.interval = positive(value(), '--interval'); break
      case '--duration': given.durationS = positive(value(), '--duration'); break
      case '--trials': given.trials = Math.round(positive(value(), '--trials')); break
      case '--scenarios': case '--scenario': given.scenarios = value().split(',').filter(Boolean); break
      case '--markdown': given.markdown = true; break
      case '--svg': given.svg = value(); break
      case '--help': case '-h': console.log(USAGE); process.exit(0); break
      default: throw new Error(`unknown argument '${arg}'`)
    }
  }
  if (given.smoke && given.preset && given.preset !== 'quick') throw new Error('--smoke runs the quick preset')
  const presetName = given.smoke ? 'smoke' : given.preset ?? 'quick'
  const preset = PRESETS[presetName]
  if (!preset || presetName === 'smoke' && !given.smoke) throw new Error(`unknown preset '${given.preset}' (quick or full)`)
  const scenarios = given.scenarios ?? ALL_SCENARIOS
  for (const s of scenarios) if (!ALL_SCENARIOS.includes(s)) throw new Error(`unknown scenario '${s}'`)
  return { ...preset, ...given, preset: presetName, scenarios }
}

// ---------------------------------------------------------------------------------------------
// Jobs and workers

function planJobs(config) {
  const { interval, trials, durationS, keys, settleIntervals, scenarios } = config
  const jobs = []
  const clusterScenarios = CLUSTER_SCENARIOS.filter((s) => scenarios.includes(s))
  if (clusterScenarios.length > 0) {
    for (const n of config.ns) {
      const expects = clusterScenarios.flatMap((s) => REPORTS[s] ?? [s]).map((s) => [s, n])
      jobs.push({ kind: 'cluster', label: `N=${n}`, n, interval, trials, durationS, scenarios: clusterScenarios, expects })
    }
  }
  if (scenarios.includes('join-storm')) {
    for (const n of config.ns) {
      jobs.push({ kind: 'cluster', storm: true, label: `join-storm N=${n}`, n, interval, trials, durationS, scenarios: ['join-storm'], expects: [['join-storm', n]] })
    }
  }
  if (scenarios.includes('throughput')) jobs.push({ kind: 'throughput', label: 'throughput', interval, keys, expects: [['throughput', 2]] })
  if (scenarios.includes('churn')) jobs.push({ kind: 'churn', label: 'churn', interval, cycles: config.cycles, expects: [['churn', 2]] })
  if (scenarios.includes('failure')) jobs.push({ kind: 'failure', label: 'failure', interval, settleIntervals, expects: [['failure', 20, 'kill'], ['failure', 20, 'stop']] })
  return jobs
}

// A last-resort bound on a whole job; the scenarios bound themselves well within it.
function jobBudgetMs(job) {
  const { bounds } = require('./scenarios')
  const b = bounds(job.interval, job.n ?? 20)
  const slack = 90e3
  if (job.kind === 'cluster') return b.membershipMs + (job.trials + 1) * (b.propagationMs + job.interval) + job.durationS * 1000 + slack
  if (job.kind === 'throughput') return b.membershipMs + b.throughputMs + slack
  if (job.kind === 'churn') return b.membershipMs + 2 * b.churnMs + slack
  return 3 * b.membershipMs + 2 * (b.detectionMs + job.settleIntervals * job.interval + 30e3) + slack
}

/**
 * Runs one job in a forked worker. `onResult` gets each result as it arrives. Resolves
 * { results, problems }: problems are strings (crash, hard timeout, no clean exit).
 */
function runJob(job, onResult) {
  return new Promise((resolve) => {
    const results = []
    const problems = []
    let stderrTail = ''
    let done = false
    let exitTimer = null
    const worker = fork(__filename, ['--worker', JSON.stringify(job)], { stdio: ['ignore', 'inherit', 'pipe', 'ipc'] })
    worker.stderr.on('data', (chunk) => {
      process.stderr.write(chunk)
      stderrTail = (stderrTail + chunk).slice(-2000)
    })
    const budget = jobBudgetMs(job)
    const hardTimer = setTimeout(() => {
      problems.push(`${job.label}: worker still running after its ${Math.round(budget / 1000)} s budget; killed`)
      worker.kill('SIGKILL')
    }, budget)
    worker.on('message', (message) => {
      if (message.type === 'result') {
        results.push(message.result)
        onResult(message.result)
      } else if (message.type === 'error') {
        problems.push(`${job.label}: ${message.error}`)
      } else if (message.type === 'done') {
        done = true
        // Every gossiper is stopped: the worker must now end by itself.
        exitTimer = setTimeout(() => {
          problems.push(`${job.label}: worker did not exit by itself within 15 s after stopping its gossipers; killed`)
          worker.kill('SIGKILL')
        }, 15e3)
      }
    })
    worker.on('exit', (code, signal) => {
      clearTimeout(hardTimer)
      clearTimeout(exitTimer)
      if (!done && problems.length === 0) {
        const thrown = stderrTail.split('\n').find((l) => /^\w*Error\b/.test(l))
        problems.push(`${job.label}: worker exited (code ${code}, signal ${signal}) before finishing${thrown ? `: ${thrown}` : ''} (its stderr is above)`)
      }
      // Scenarios the worker never reported are errors, so that nothing silently disappears.
      for (const [scenario, n, mode] of job.expects) {
        if (!results.some((r) => r.scenario === scenario && r.n === n && r.mode === mode)) {
          const missing = { scenario, n, ...(mode ? { mode } : {}), interval: job.interval, status: 'error', error: problems.join('; ') || 'not reported' }
          results.push(missing)
          onResult(missing)
        }
      }
      resolve({ results, problems })
    })
  })
}

async function worker(job) {
  const scenarios = require('./scenarios')
  const run = { cluster: scenarios.runCluster, throughput: scenarios.runThroughput, churn: scenarios.runChurn, failure: scenarios.runFailure }[job.kind]
  const emit = (result) => process.send({ type: 'result', result })
  try {
    await run(job, emit)
  } catch (error) {
    process.send({ type: 'error', error: error.stack || String(error) })
  }
  process.send({ type: 'done' }, () => process.disconnect())
}

// ---------------------------------------------------------------------------------------------
// Output

function duration(ms) {
  if (ms === null || ms === undefined) return '?'
  if (ms < 1) return `${ms.toFixed(2)} ms`
  if (ms < 1000) return `${ms.toPrecision(3)} ms`
  return `${(ms / 1000).toFixed(2)} s`
}
const firstLine = (text) => String(text).split('\n')[0]
const orTimeout = (ms, timeoutS) => (ms === null ? `>${timeoutS} s (timeout)` : duration(ms))
const times = (x) => (x === null ? 'n/a' : `x${x.toFixed(2)}`)
const rounds = (xs) => xs.map((x) => (x === null ? '?' : x < 0.1 ? x.toFixed(3) : x < 10 ? x.toFixed(2) : x.toFixed(1))).join(' / ')
const kilo = (x) => (x === null ? '?' : x >= 1e4 ? `${Math.round(x / 1000)}k` : String(Math.round(x)))

function figures(r) {
  if (r.status === 'error') return `ERROR: ${firstLine(r.error)}`
  switch (r.scenario) {
    case 'membership':
      return r.status === 'timeout'
        ? `>${r.timeoutS} s (timeout); ${r.nodesComplete}/${r.n} nodes saw everyone`
        : `all ${r.n} see all others live ${duration(r.secondsAfterLastStart * 1000)} after the last start ` +
          `(${duration(r.seconds * 1000)} after the first; starting took ${duration(r.startSeconds * 1000)}); ` +
          `joining: CPU ${r.join.cpuCores} cores, ${r.join.bytesPerNodePerSec} B/node/s, peak RSS ${r.peakRssMB} MB`
    case 'join-storm':
      return `${r.status === 'timeout' ? `>${r.timeoutS} s (timeout), ${r.nodesComplete}/${r.n} nodes saw everyone` : `all see all ${duration(r.secondsAfterLastStart * 1000)} after the last start`}` +
        ` (${r.n - 1} started at once in ${duration(r.startSeconds * 1000)}); ${r.falseFailures} false peer_failed` +
        ` (${r.falseFailuresUntilMembership} until membership); joining: CPU ${r.join.cpuCores} cores, ${r.join.bytesPerNodePerSec} B/node/s, peak RSS ${r.peakRssMB} MB`
    case 's1':
      return `write ${r.writtenAtS} s after the first start: ${r.received}/${r.of} have it; first ${orTimeout(r.firstMs, r.timeoutS)}, ` +
        `median ${orTimeout(r.medianMs, r.timeoutS)}, last ${orTimeout(r.lastMs, r.timeoutS)}`
    case 'join-failures':
      return `${r.falseFailures} false peer_failed from the first start until the steady window (${r.untilS} s; ` +
        `${r.untilMembership} until membership), by ${r.observers} observers about ${r.peers} peers`
    case 'propagation': {
      return `first ${orTimeout(r.firstMs, r.timeoutS)}, median ${orTimeout(r.medianMs, r.timeoutS)}, last ${orTimeout(r.lastMs, r.timeoutS)}` +
        ` = ${rounds([r.firstRounds, r.medianRounds, r.lastRounds])} rounds (median of ${r.trials} trial${r.trials > 1 ? 's' : ''}` +
        `${r.trialsTimedOut ? `, ${r.trialsTimedOut} timed out` : ''})`
    }
    case 'steady':
      return `CPU ${r.first.cpuCores} -> ${r.second.cpuCores} cores (${times(r.ratio.cpuCores)}); ` +
        `sent ${r.first.bytesPerNodePerSec} -> ${r.second.bytesPerNodePerSec} B/node/s (${times(r.ratio.bytesPerNodePerSec)}); ` +
        `RSS ${r.first.rssMB} -> ${r.second.rssMB} MB (${times(r.ratio.rssMB)}); halves of ${r.windowS} s`
    case 'stability':
      return `${r.falsePositives} peer_failed in the ${r.windowS} s steady window${r.falsePositives > 0 ? ' (FALSE POSITIVES)' : ''}`
    case 'throughput':
      return `${r.received}/${r.keys} keys at B; ${kilo(r.updatesPerSec)} updates/s first->last at B; ` +
        `last update ${orTimeout(r.lastUpdateMs, r.timeoutS)} after first write (${kilo(r.endToEndPerSec)}/s end to end); ` +
        `write loop ${duration(r.writeLoopMs)} (${kilo(r.writesPerSec)}/s); peak RSS ${r.peakRssMB} MB`
    case 'churn': {
      const [first, second] = r.passes
      const after = r.passes.map((p) => `${p.rssAfterMB} MB`).join(' -> ')
      return `${r.cycles} set+delete cycles x${r.passes.length} at ${kilo(first?.cyclesPerSec ?? null)}/s; ` +
        `RSS ${r.baselineRssMB} MB before, ${after} once collected everywhere (peak ${Math.max(...r.passes.map((p) => p.peakRssMB))} MB); ` +
        `collected ${duration(second?.collectedAfterMs ?? first?.collectedAfterMs)} after the last (tombstoneTtl ${r.tombstoneTtl} ms)`
    }
    case 'failure': {
      const how = r.mode === 'kill' ? 'SIGKILL' : 'stop()'
      const s = (x) => (x === null ? `>${r.timeoutS} s (timeout)` : duration(x * 1000))
      return `${how}: first ${s(r.firstS)}, median ${s(r.medianS)}, last ${s(r.lastS)}` +
        ` = ${rounds([r.firstRounds, r.medianRounds, r.lastRounds])} rounds; ${r.detected}/${r.observers} observers` +
        (r.otherPeerFailed ? `; ${r.otherPeerFailed} other peer_failed meanwhile` : '')
    }
    default:
      return JSON.stringify(r)
  }
}

function table(results) {
  const rows = [['scenario', 'N', 'figures'], ...results.map((r) => [r.scenario + (r.mode ? ` (${r.mode})` : ''), String(r.n), figures(r)])]
  const widths = [0, 1].map((c) => Math.max(...rows.map((row) => row[c].length)))
  const line = (row) => `${row[0].padEnd(widths[0])}  ${row[1].padStart(widths[1])}  ${row[2]}`
  return [line(rows[0]), '-'.repeat(widths[0] + widths[1] + 4 + 60), ...rows.slice(1).map(line)].join('\n')
}

// README tables: one row per figure and N, then the cost per node against N.
function markdown(results) {
  const rows = []
  const add = (figure, r, value) => rows.push(`| ${figure} | ${r.n} | ${value} |`)
  const ms = (x) => (x === null || x === undefined ? 'timeout' : duration(x))
  for (const r of results) {
    if (r.status === 'error') { add(r.scenario, r, 'error'); continue }
    switch (r.scenario) {
      case 'membership':
        add('membership complete, after the last start', r, r.status === 'timeout' ? `timeout (${r.nodesComplete} complete)` : duration(r.secondsAfterLastStart * 1000))
        break
      case 'join-storm':
        add('join storm: membership complete, after the last start', r, r.status === 'timeout' ? `timeout (${r.nodesComplete} complete)` : duration(r.secondsAfterLastStart * 1000))
        add('join storm: false peer_failed', r, `${r.falseFailures} (${r.falseFailuresUntilMembership} until membership)`)
        add('join storm: CPU while joining', r, `${r.join.cpuCores} cores`)
        break
      case 'join-failures':
        add('false peer_failed while joining', r, String(r.falseFailures))
        break
      case 's1':
        add('s1: a write 10 s after the first start, until all have it', r, ms(r.lastMs))
        break
      case 'propagation':
        add('a write in steady state, until all have it (median of trials)', r, ms(r.lastMs))
        break
      case 'steady':
        add('CPU, steady', r, `${r.second.cpuCores} cores`)
        add('sent per node per second, steady', r, `${r.second.bytesPerNodePerSec} B`)
        add('RSS, steady', r, `${r.second.rssMB} MB`)
        break
      case 'stability':
        add('false peer_failed in the steady window', r, `${r.falsePositives} in ${r.windowS} s`)
        break
      default:
        break
    }
  }
  const table = ['| figure | N | value |', '|---|---:|---:|', ...rows]
  const steady = results.filter((r) => r.scenario === 'steady' && r.status === 'ok')
  if (steady.length > 0) {
    // Memory is counted above the process before its first gossiper: what the gossipers take.
    table.push('', '| N | CPU per node (ms/s) | sent per node (B/s) | RSS per node (KB) | RSS per (node, peer) pair (B) |',
      '|---:|---:|---:|---:|---:|')
    for (const r of steady) {
      const gossipersMB = r.second.rssMB - (r.rssMBBeforeFirstStart ?? 0)
      table.push(`| ${r.n} | ${(r.second.cpuCores * 1000 / r.n).toFixed(2)} | ${Math.round(r.second.bytesPerNodePerSec)} | ` +
        `${Math.round(gossipersMB * 1024 / r.n)} | ${Math.round(gossipersMB * 2 ** 20 / (r.n * (r.n - 1)))} |`)
    }
  }
  return table.join('\n')
}

// ---------------------------------------------------------------------------------------------

async function main() {
  let config
  try {
    config = parseArgs(process.argv.slice(2))
  } catch (error) {
    console.error(`${error.message}\n${USAGE}`)
    process.exit(2)
  }
  const jobs = planJobs(config)
  const begun = Date.now()
  const log = (text) => process.stderr.write(`[bench ${((Date.now() - begun) / 1000).toFixed(1)} s] ${text}\n`)
  log(`preset ${config.preset}: N = ${config.ns.join(', ')}, interval ${config.interval} ms, steady window ${config.durationS} s, ` +
    `${config.trials} propagation trial(s), scenarios ${config.scenarios.join(',')}; one worker process per job`)

  const results = []
  const problems = []
  const shutdowns = []
  for (const job of jobs) {
    log(`${job.label}: starting`)
    const outcome = await runJob(job, (r) => {
      if (r.scenario === 'shutdown') {
        shutdowns.push(r)
        log(`${job.label}: all gossipers stopped in ${duration(r.ms)}${r.status === 'ok' ? '' : ' (stop() TIMED OUT)'}`)
        return
      }
      const line = { ...r, preset: config.preset }
      results.push(line)
      console.log(`BENCH ${JSON.stringify(line)}`)
      log(`${job.label}: ${r.scenario}${r.mode ? ` (${r.mode})` : ''}: ${figures(r)}`)
    })
    problems.push(...outcome.problems)
    log(`${job.label}: done`)
  }

  if (config.svg) {
    fs.mkdirSync(config.svg, { recursive: true })
    const { propagationSvg } = require('./svg')
    for (const r of results) {
      if (r.scenario === 'propagation' && r.status !== 'error') {
        const file = path.join(config.svg, `propagation-N${r.n}.svg`)
        fs.writeFileSync(file, propagationSvg(r))
        log(`wrote ${file}`)
      }
    }
  }

  const TABLE_ORDER = ['membership', 'join-storm', 's1', 'join-failures', 'propagation', 'steady', 'stability', 'throughput', 'churn', 'failure']
  const order = (r) => TABLE_ORDER.indexOf(r.scenario)
  const sorted = [...results].sort((a, b) => order(a) - order(b) || a.n - b.n)
  console.log()
  console.log(table(sorted))
  if (config.markdown) console.log(`\n${markdown(sorted)}`)
  for (const s of shutdowns) if (s.status !== 'ok') problems.push(`N=${s.n}: stop() did not resolve for every gossiper within 30 s`)
  for (const p of problems) console.log(`problem: ${firstLine(p)}`)
  const totalS = ((Date.now() - begun) / 1000).toFixed(1)
  console.log(`\n${config.preset} preset: ${results.length} results in ${totalS} s`)

  const failed = results.filter((r) => r.status === 'error' || (config.smoke && r.status !== 'ok'))
  if (failed.length > 0 || (config.smoke && problems.length > 0)) {
    console.log(`FAILED: ${failed.map((r) => `${r.scenario}${r.mode ? ` (${r.mode})` : ''} N=${r.n}: ${r.status}`).concat(config.smoke ? problems.map(firstLine) : []).join('; ')}`)
    process.exitCode = 1
  } else if (config.smoke) {
    console.log('smoke: every scenario completed')
  }
}

if (process.argv[2] === '--worker') {
  worker(JSON.parse(process.argv[3]))
} else {
  main()
}
