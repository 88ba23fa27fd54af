'use strict'
// A hand-written SVG line chart of propagation: x = ms since the write, y = share of the N nodes
// holding the update (the writer holds it at 0 ms), one step line per trial.

const WIDTH = 640
const HEIGHT = 400
const MARGIN = { left: 60, right: 130, top: 40, bottom: 50 }
const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf']

const escape = (text) => String(text).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
const fmt = (x) => String(Number(x.toPrecision(6))) // 0.30000000000000004 -> '0.3'

/** A "nice" tick step (1, 2 or 5 times a power of ten) giving about `count` ticks up to `max`. */
function tickStep(max, count = 5) {
  const raw = max / count
  const power = 10 ** Math.floor(Math.log10(raw))
  const unit = raw / power
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * power
}

/**
 * result: a propagation result of bench/scenarios.js ({ n, interval, perTrial: [{ arrivalsMs, of }] }).
 * Returns the SVG document as a string.
 */
function propagationSvg(result) {
  const { n, interval, perTrial } = result
  const latest = Math.max(0, ...perTrial.flatMap((t) => t.arrivalsMs))
  const step = tickStep(latest > 0 ? latest : 1)
  const xMax = Math.max(step, Math.ceil(latest / step) * step)
  const plotW = WIDTH - MARGIN.left - MARGIN.right
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom
  const x = (ms) => MARGIN.left + (ms / xMax) * plotW
  const y = (percent) => MARGIN.top + plotH - (percent / 100) * plotH
  const px = (v) => v.toFixed(1)

  const out = []
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${HEIGHT}" viewBox="0 0 ${WIDTH} ${HEIGHT}" font-family="sans-serif" font-size="12">`)
  out.push(`<rect width="${WIDTH}" height="${HEIGHT}" fill="white"/>`)
  out.push(`<text x="${WIDTH / 2}" y="22" text-anchor="middle" font-size="14">${escape(`Propagation of one write, N = ${n}, gossip interval ${interval} ms`)}</text>`)

  // Grid, ticks and labels.
  for (let i = 0; i * step <= xMax * (1 + 1e-9); i++) {
    const ms = i * step
    out.push(`<line x1="${px(x(ms))}" y1="${MARGIN.top}" x2="${px(x(ms))}" y2="${MARGIN.top + plotH}" stroke="#eee"/>`)
    out.push(`<text x="${px(x(ms))}" y="${MARGIN.top + plotH + 18}" text-anchor="middle">${fmt(ms)}</text>`)
  }
  for (let percent = 0; percent <= 100; percent += 25) {
    out.push(`<line x1="${MARGIN.left}" y1="${px(y(percent))}" x2="${MARGIN.left + plotW}" y2="${px(y(percent))}" stroke="#eee"/>`)
    out.push(`<text x="${MARGIN.left - 8}" y="${px(y(percent) + 4)}" text-anchor="end">${percent} %</text>`)
  }
  out.push(`<line x1="${MARGIN.left}" y1="${MARGIN.top + plotH}" x2="${MARGIN.left + plotW}" y2="${MARGIN.top + plotH}" stroke="black"/>`)
  out.push(`<line x1="${MARGIN.left}" y1="${MARGIN.top}" x2="${MARGIN.left}" y2="${MARGIN.top + plotH}" stroke="black"/>`)
  out.push(`<text x="${MARGIN.left + plotW / 2}" y="${HEIGHT - 12}" text-anchor="middle">ms since the write</text>`)
  out.push(`<text transform="translate(16 ${MARGIN.top + plotH / 2}) rotate(-90)" text-anchor="middle">nodes holding the update</text>`)

  // One step line per trial: the share rises by 1/N at each arrival.
  perTrial.forEach((trial, i) => {
    const color = COLORS[i % COLORS.length]
    let holders = 1
    const points = [[0, (holders / n) * 100]]
    for (const ms of [...trial.arrivalsMs].sort((a, b) => a - b)) {
      points.push([ms, (holders / n) * 100])
      holders++
      points.push([ms, (holders / n) * 100])
    }
    points.push([xMax, (holders / n) * 100])
    const polyline = points.map(([ms, percent]) => `${px(x(ms))},${px(y(percent))}`).join(' ')
    out.push(`<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${polyline}"/>`)
    const legendY = MARGIN.top + 10 + i * 18
    const label = `trial ${i + 1}: ${trial.received}/${trial.of}`
    out.push(`<line x1="${WIDTH - MARGIN.right + 12}" y1="${legendY}" x2="${WIDTH - MARGIN.right + 32}" y2="${legendY}" stroke="${color}" stroke-width="2"/>`)
    out.push(`<text x="${WIDTH - MARGIN.right + 36}" y="${legendY + 4}">${escape(label)}</text>`)
  })
  out.push('</svg>')
  return out.join('\n') + '\n'
}

module.exports = { propagationSvg }
