'use strict'
// `npm run test:hosts`: the multi-host suite, one network namespace per host.
//   node __test__/hosts/run.js [scenario ...]    (scenarios: names ip-seeds partition restart)
// Skips (exit 0, one message) without root or without network namespace support. Otherwise it
// takes the suite's lock, removes what a crashed earlier run left, runs the *.hosts.js files
// one at a time with node --test, removes anything left again (also on SIGINT/SIGTERM), checks
// nothing of the suite remains, and repeats every `HOSTS {json}` figures line at the end.

const fs = require('node:fs')
const path = require('node:path')
const { spawn } = require('node:child_process')
const netns = require('./netns')

const SCENARIOS = ['names', 'ip-seeds', 'partition', 'restart']
const RUN_TIMEOUT_MS = 10 * 60 * 1000
const SIGNAL_CODES = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129 }

function main() {
  const began = Date.now()
  netns.leaveSignalsToCaller()
  const wanted = process.argv.slice(2)
  const unknown = wanted.filter((name) => !SCENARIOS.includes(name))
  if (unknown.length > 0) {
    console.error(`unknown scenario(s) ${unknown.join(', ')}; known: ${SCENARIOS.join(', ')}`)
    process.exit(2)
  }

  let reason
  try {
    reason = netns.unsupportedReason()
  } catch (error) {
    console.error(`hosts suite: ${error.message}`)
    process.exit(1)
  }
  if (reason) {
    console.log(`SKIP hosts suite: ${reason}`)
    process.exit(0)
  }

  const removed = netns.cleanLeftovers()
  if (removed.length > 0) console.log(`hosts suite: removed namespaces left by an earlier run: ${removed.join(', ')}`)

  const files = (wanted.length > 0 ? wanted : SCENARIOS).map((name) => path.join(__dirname, `${name}.hosts.js`))
  const args = ['--test', '--test-concurrency=1', ...(process.stdout.isTTY ? ['--test-reporter=spec'] : []), ...files]
  const child = spawn(process.execPath, args, {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, [netns.LOCK_ENV]: String(process.pid) },
  })

  const figures = []
  let partial = ''
  child.stdout.on('data', (chunk) => {
    process.stdout.write(chunk)
    partial += chunk.toString('utf8')
    let newline
    while ((newline = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, newline)
      partial = partial.slice(newline + 1)
      const match = /HOSTS (\{.*\})\s*$/.exec(line)
      if (match) figures.push(match[1])
    }
  })

  let signalled = null
  let killTimer = null
  const forceKill = (why) => {
    if (child.exitCode === null && child.signalCode === null) {
      console.error(`hosts suite: ${why}; killing the test process`)
      child.kill('SIGKILL')
    }
  }
  for (const signal of Object.keys(SIGNAL_CODES)) {
    process.on(signal, () => {
      if (signalled) return
      signalled = signal
      console.error(`hosts suite: ${signal}, stopping the tests, then removing the namespaces`)
      child.kill(signal)
      killTimer = setTimeout(() => forceKill('the test process did not end within 15 s'), 15000)
    })
  }
  const overall = setTimeout(() => forceKill(`the run exceeded ${RUN_TIMEOUT_MS / 60000} min`), RUN_TIMEOUT_MS)

  child.on('exit', (code, signal) => {
    clearTimeout(overall)
    clearTimeout(killTimer)
    let status = code ?? 1
    // Whatever the test process did (crashed, killed), nothing of the suite may remain.
    try {
      netns.cleanLeftovers()
    } catch (error) {
      console.error(`hosts suite: cleanup failed: ${error.message}`)
      status = 1
    }
    const left = netns.namespaces().filter((ns) => netns.OUR_NAMESPACE.test(ns))
    let etc = []
    try {
      etc = fs.readdirSync(netns.NETNS_ETC).filter((name) => netns.OUR_NAMESPACE.test(name))
    } catch {}
    netns.releaseLock()

    console.log('\nhosts suite figures:')
    for (const line of figures) console.log(`HOSTS ${line}`)
    const seconds = ((Date.now() - began) / 1000).toFixed(1)
    console.log(`hosts suite: ${seconds} s; test process ${signal ? `killed by ${signal}` : `exit code ${code}`}`)
    if (left.length > 0 || etc.length > 0) {
      console.log(`hosts suite: LEFTOVERS: namespaces [${left.join(', ')}], ${netns.NETNS_ETC} entries [${etc.join(', ')}]`)
      status = 1
    } else {
      console.log(`hosts suite: no namespace and no ${netns.NETNS_ETC} entry of the suite remains`)
    }
    process.exit(signalled ? SIGNAL_CODES[signalled] : status)
  })
}

main()
