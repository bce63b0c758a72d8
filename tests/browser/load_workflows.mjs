#!/usr/bin/env node
// Load UI-format workflows into the real ComfyUI frontend and convert them to API format.
//
// Why: UI workflows store widget values by position, so only the real frontend (with the
// server's /object_info) can tell whether a saved workflow still maps onto the nodes.
// app.graphToPrompt() is what the Run button sends, so its output is the API truth.
//
// Usage:
//   node load_workflows.mjs --url http://127.0.0.1:PORT --out result.json \
//        [--screenshot-dir DIR] [--timeout-ms 90000] workflow.json [...]
// result.json: { "<file as given>": { "output": {api prompt} | null, "missing": [node types],
//                                     "errors": [messages] } }
// "errors": page errors and console errors (minus the allow-list below) seen while that
// workflow loaded, plus those seen during the page load itself (they concern every workflow).
// --screenshot-dir writes DIR/<workflow basename>.png of each loaded graph.
// Exit code: 0 when the page loaded (per-workflow problems are in the JSON), 1 otherwise.
//
// Uses Debian's /usr/bin/chromium ($CHROMIUM_PATH overrides); playwright-core never
// downloads a browser.

import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, extname, join, resolve } from 'node:path';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

// Console errors that a plain page load logs with no custom nodes at all (measured with
// frontend 1.32.9). They say nothing about workflows.
const HARMLESS = [
  // user.css, userdata files of a new user
  /^Failed to load resource: the server responded with a status of 404/,
  // the page asks api.comfy.org for node-pack metadata; its own CSP (or DNS) blocks it
  /^Connecting to 'https:\/\/api\.comfy\.org\/.*violates the following Content Security Policy/,
  /^Failed to load resource: net::ERR_(NAME_NOT_RESOLVED|CONNECTION_REFUSED|INTERNET_DISCONNECTED)/,
  // frontend 1.32.9 bug on every load (GraphView load -> setting onChange)
  /^TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange /,
];
const isHarmless = (msg) => HARMLESS.some((re) => re.test(msg));
const head = (text, lines = 4) => String(text).split('\n').slice(0, lines).join('\n');

function parseArgs(argv) {
  const opts = { url: null, out: null, screenshotDir: null, timeoutMs: 90000, files: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--url') opts.url = argv[++i];
    else if (a === '--out') opts.out = argv[++i];
    else if (a === '--screenshot-dir') opts.screenshotDir = argv[++i];
    else if (a === '--timeout-ms') opts.timeoutMs = Number(argv[++i]);
    else if (a.startsWith('--')) throw new Error(`unknown option ${a}`);
    else opts.files.push(a);
  }
  if (!opts.url || !opts.out || opts.files.length === 0) {
    throw new Error('usage: load_workflows.mjs --url URL --out OUT.json [--screenshot-dir DIR] WF.json...');
  }
  return opts;
}

// In the page: load one workflow, list node types the frontend does not know, convert.
async function loadAndConvert(graph) {
  await window.app.loadGraphData(graph, true, true, null, {
    showMissingNodesDialog: false, showMissingModelsDialog: false,
  });
  // after loading, subgraph ids are registered too; check every node list
  const lists = [graph.nodes ?? []];
  for (const sg of graph.definitions?.subgraphs ?? []) lists.push(sg.nodes ?? []);
  const missing = new Set();
  for (const nodes of lists) {
    for (const n of nodes) if (!(n.type in LiteGraph.registered_node_types)) missing.add(n.type);
  }
  const prompt = await window.app.graphToPrompt();
  return { missing: [...missing].sort(), output: prompt.output };
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const base = opts.url.replace(/\/+$/, '');
  // A new user gets the template browser over the canvas: mark the tutorial done. This
  // writes the test server's own user settings (its user directory is a tmp dir).
  const res = await fetch(`${base}/api/settings/Comfy.TutorialCompleted`, {
    method: 'POST', body: 'true', headers: { 'Content-Type': 'application/json' },
  });
  if (!res.ok) throw new Error(`POST ${base}/api/settings/... answered ${res.status}`);

  const userDataDir = mkdtempSync(join(tmpdir(), 'lidit-chromium-'));
  const ignored = [];
  let errors = [];
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport: { width: 1600, height: 1000 },
  });
  try {
    // hide the "Introducing Nodes 2.0" banner, which covers the tab bar
    await context.addInitScript(() => localStorage.setItem('vueNodesBannerDismissed', 'true'));
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(opts.timeoutMs);
    page.on('pageerror', (err) => errors.push(`pageerror: ${head(err.stack || err.message)}`));
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      const text = head(m.text());
      if (isHarmless(text)) ignored.push(text);
      else errors.push(`console.error: ${text}`);
    });

    const t0 = Date.now();
    await page.goto(base + '/', { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(
      () => window.app?.graph && window.LiteGraph &&
        Object.keys(window.LiteGraph.registered_node_types).length > 50,
      null, { timeout: opts.timeoutMs, polling: 200 },
    );
    const nodeTypes = await page.evaluate(() => Object.keys(LiteGraph.registered_node_types).length);
    console.error(`[load_workflows] app ready after ${Date.now() - t0} ms (${nodeTypes} node types)`);
    const pageErrors = errors;

    const result = {};
    for (const file of opts.files) {
      errors = [...pageErrors];
      const entry = { output: null, missing: [], errors };
      result[file] = entry;
      let graph;
      try {
        graph = JSON.parse(readFileSync(file, 'utf8'));
      } catch (e) {
        errors.push(`cannot read workflow: ${e.message}`);
        continue;
      }
      try {
        Object.assign(entry, await page.evaluate(loadAndConvert, graph));
      } catch (e) {
        errors.push(`load/convert failed: ${head(e.message, 2)}`);
      }
      if (opts.screenshotDir) {
        mkdirSync(opts.screenshotDir, { recursive: true });
        await page.evaluate(() => window.app.canvas?.setDirty(true, true));
        await page.waitForTimeout(300);
        await page.screenshot({ path: join(opts.screenshotDir, basename(file, extname(file)) + '.png') });
      }
    }
    console.error(`[load_workflows] ${opts.files.length} workflow(s); ${ignored.length} allow-listed console errors`);
    writeFileSync(resolve(opts.out), JSON.stringify(result, null, 1));
  } finally {
    await context.close();
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`[load_workflows] ${e.stack || e}`);
  process.exit(1);
});
