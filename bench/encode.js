'use strict'
// Micro-benchmark of the value codec's encoder (values.js), outside any gossiper.
//
//   node bench/encode.js [--count 200000] [--rounds 7] [other/values.js ...]
//
// Encodes `count` small objects of the shape typical for gossiped state, `rounds` times, and
// prints the median CPU time (user + system) per round: CPU rather than wall time, so that
// other processes on the machine matter less. Extra module paths are measured in the same
// process, alternating round by round with ./values.js, for a fair before/after ratio.

const path = require('node:path')

function parseArgs(argv) {
  const given = { count: 200000, rounds: 7, modules: [] }
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--count') given.count = Number(argv[++i])
    else if (argv[i] === '--rounds') given.rounds = Number(argv[++i])
    else given.modules.push(path.resolve(argv[i]))
  }
  return given
}

function sample(i) {
  return {
    id: i,
    name: `node-${i}`,
    load: (i % 100) / 100,
    up: i % 7 !== 0,
    tags: ['web', 'eu-west', i % 2 ? 'blue' : 'green'],
    ports: { http: 8080, admin: 9000 + (i % 10) },
  }
}

function main() {
  const { count, rounds, modules } = parseArgs(process.argv.slice(2))
  const candidates = [path.join(__dirname, '..', 'values.js'), ...modules]
  const encoders = candidates.map((file) => ({ file, encode: require(file).encodeValue, ms: [], bytes: 0 }))
  const inputs = Array.from({ length: count }, (_, i) => sample(i))
  // Warm-up, and a check that every encoder writes the same bytes.
  for (const e of encoders) {
    for (let i = 0; i < count; i++) e.bytes += e.encode(inputs[i]).length
  }
  for (let r = 0; r < rounds; r++) {
    for (const e of encoders) {
      const start = process.cpuUsage()
      let sink = 0
      for (let i = 0; i < count; i++) sink += e.encode(inputs[i]).length
      const used = process.cpuUsage(start)
      e.ms.push((used.user + used.system) / 1e3)
      if (sink !== e.bytes) throw new Error(`${e.file}: output changed between rounds`)
    }
  }
  const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1]
  const base = median(encoders[0].ms)
  for (const e of encoders) {
    const m = median(e.ms)
    console.log(`${path.relative(process.cwd(), e.file)}: ${count} values, ${e.bytes} bytes, median ${m.toFixed(1)} ms CPU/round` +
      ` (${((count / m) * 1000 / 1e6).toFixed(2)} M values/s), ${(m / base).toFixed(3)}x of ./values.js`)
  }
}

main()
