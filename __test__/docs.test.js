'use strict'
// The option table in src/config.rs is the one source of defaults and bounds: index.js reads it
// through the binding, and this test holds index.d.ts and the README to it.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const { DEFAULTS } = require('..')
const native = require('../gossiper.node')

const root = path.join(__dirname, '..')
const typings = fs.readFileSync(path.join(root, 'index.d.ts'), 'utf8')
const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8')
const specs = native.optionSpecs()

test('DEFAULTS holds every option of the engine table, with its default', () => {
  for (const spec of specs) assert.equal(DEFAULTS[spec.name], spec.default, spec.name)
  const names = [...specs.map((s) => s.name), ...native.otherOptionNames()].sort()
  assert.deepEqual(Object.keys(DEFAULTS).sort(), names)
})

test('index.d.ts documents every option with the engine default', () => {
  const options = typings.slice(typings.indexOf('export interface GossiperOptions'))
  for (const spec of specs) {
    const at = options.indexOf(`  ${spec.name}?:`)
    assert.ok(at > 0, `${spec.name} is typed`)
    const comment = options.slice(options.lastIndexOf('/**', at), at)
    assert.match(comment, new RegExp(`Default ${spec.default}\\b`), `${spec.name}: ${comment}`)
  }
  for (const name of native.otherOptionNames()) assert.ok(options.includes(`  ${name}?:`), `${name} is typed`)
})

test('the README option table lists every option with the engine default', () => {
  for (const spec of specs) {
    const row = readme.split('\n').find((line) => line.startsWith(`| \`${spec.name}\``))
    assert.ok(row, `README row for ${spec.name}`)
    const shown = row.split('|')[2].trim().replace(/`/g, '')
    assert.equal(Number(shown), spec.default, `${spec.name}: README says ${shown}`)
  }
  for (const name of native.otherOptionNames()) {
    assert.ok(readme.split('\n').some((line) => line.startsWith(`| \`${name}\``)), `README row for ${name}`)
  }
})
