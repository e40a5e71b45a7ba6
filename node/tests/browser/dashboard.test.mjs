// The dashboard in a real browser (Debian's chromium through playwright-core), under `node --test`.
// Run by node/tests/dashboard_browser.rs, which starts a real 3-node cluster, submits 10,000 tasks
// and passes the addresses in the environment:
//   MAOS_DASHBOARDS  {"1": "http://127.0.0.1:P", ...}   each node's dashboard
//   MAOS_APIS        {"1": "http://127.0.0.1:P", ...}   each node's client API (REST)
//   MAOS_PIDS        {"1": 1234, ...}                    each node's process, to kill the leader
//   MAOS_BROWSER_MODULES  the folder holding node_modules/playwright-core (setup.sh installs it)
//   MAOS_SCREENSHOTS      where screenshots go (test artefacts)
//   MAOS_BULK_TASKS       how many bulk tasks were submitted before the run
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.env.MAOS_BROWSER_MODULES, 'package.json'));
const { chromium } = require('playwright-core');

const dashboards = JSON.parse(process.env.MAOS_DASHBOARDS);
const apis = JSON.parse(process.env.MAOS_APIS);
const pids = JSON.parse(process.env.MAOS_PIDS);
const shots = process.env.MAOS_SCREENSHOTS;
const bulkTasks = Number(process.env.MAOS_BULK_TASKS);
const killed = new Set();
/// The list page's load budget, measured in the browser (navigation start to the load event).
const LIST_LOAD_MS_MAX = 300;

let browser;
let context;

before(async () => {
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
});

after(async () => {
  await browser?.close();
});

async function shot(page, name) {
  const file = path.join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot: ${file}`);
}

/// A REST call to the first node that answers (the killed leader does not).
async function api(method, route, body) {
  let last;
  for (const [id, base] of Object.entries(apis)) {
    if (killed.has(id)) continue;
    try {
      const response = await fetch(base + route, {
        method,
        headers: body ? { 'content-type': 'application/json' } : {},
        body: body ? JSON.stringify(body) : undefined,
        signal: AbortSignal.timeout(10_000),
      });
      const json = await response.json();
      assert.ok(response.ok, `${method} ${route} on node ${id}: ${response.status} ${JSON.stringify(json)}`);
      return json;
    } catch (error) {
      last = error;
    }
  }
  throw last;
}

async function leaderId() {
  for (let i = 0; i < 100; i++) {
    const status = await api('GET', '/api/v1/cluster');
    if (status.leader_id) return String(status.leader_id);
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('no leader known');
}

/// Mark the page's window so a reload (which would lose the mark) is caught.
async function markNoReload(page) {
  await page.evaluate(() => { window.__maosNoReload = 'kept'; });
}
async function assertNoReload(page) {
  assert.equal(await page.evaluate(() => window.__maosNoReload), 'kept', 'the page reloaded');
}

async function assertReadOnlyNotice(page) {
  const notice = page.locator('#read-only');
  await notice.waitFor();
  assert.match(await notice.textContent(), /Read-only/);
}

test('the overview shows three nodes and the leader, with a strict CSP', async () => {
  const page = await context.newPage();
  const response = await page.goto(dashboards['1']);
  const csp = response.headers()['content-security-policy'];
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  await assertReadOnlyNotice(page);
  const leader = await leaderId();
  const rows = page.locator('#node-table tbody tr');
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('#node-table tbody tr')];
    return rows.length === 3 && rows.every((r) => r.dataset.role !== 'unreachable');
  }, null, { timeout: 15_000 });
  assert.equal(await rows.count(), 3);
  assert.deepEqual(
    (await rows.evaluateAll((rs) => rs.map((r) => r.dataset.nodeId))).sort(),
    ['1', '2', '3'],
  );
  await page.waitForFunction((id) => document.querySelector('#leader')?.dataset.leaderId === id, leader);
  assert.equal(await page.locator(`#node-table tr[data-node-id="${leader}"]`).getAttribute('data-role'), 'leader');
  await page.locator('#chart-throughput').waitFor();
  await shot(page, 'overview');
  await page.close();
});

test('a task whose description holds <script> shows it as text', async () => {
  const description = '<script>window.__maosInjected = 1</script><img src="x" onerror="window.__maosInjected = 2">';
  const submitted = await api('POST', '/api/v1/tasks', {
    task_type: 'unserved-escape-check', description, input: '<b>bold?</b> & "quotes"', submitter: '<i>mallory</i>',
  });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`${dashboards['2']}/tasks/${submitted.task_id}`);
  await assertReadOnlyNotice(page);
  await page.locator('#task-description').waitFor();
  assert.equal(await page.locator('#task-description').textContent(), description);
  assert.equal(await page.locator('#task-input').textContent(), '<b>bold?</b> & "quotes"');
  assert.equal(await page.evaluate(() => window.__maosInjected), undefined, 'the description ran as script');
  assert.equal(await page.locator('main img, main script, main b, main i').count(), 0, 'user text became elements');
  // The list page shows it as text too, after a live update.
  await page.goto(`${dashboards['2']}/tasks?type=unserved-escape-check`);
  const cell = page.locator(`tr[data-task-id="${submitted.task_id}"] td.description`);
  await cell.waitFor();
  assert.equal(await cell.textContent(), description);
  await page.waitForTimeout(1200); // a live update or two
  assert.equal(await page.evaluate(() => window.__maosInjected), undefined);
  assert.deepEqual(errors, []);
  await page.goto(`${dashboards['2']}/tasks/${submitted.task_id}`);
  await shot(page, 'task');
  await page.close();
});

test('a planned workflow\'s DAG reaches COMPLETED without a reload', async () => {
  const branches = 4;
  const submitted = await api('POST', '/api/v1/tasks', {
    task_type: 'mixed',
    description: 'browser test: four branches, then an aggregate',
    input: JSON.stringify({ branches, branch_type: 'researcher', branch_input: 'sleep:1500', aggregate_type: 'analyst' }),
    max_retries: 2,
  });
  const page = await context.newPage();
  await page.goto(`${dashboards['3']}/workflows/${submitted.task_id}`);
  await assertReadOnlyNotice(page);
  await markNoReload(page);
  // The plan appears, then its subtasks run and complete, all through live updates.
  await page.waitForFunction((n) => document.querySelectorAll('#dag g.dag-node').length === n, branches + 1,
    { timeout: 30_000 });
  await page.waitForFunction(() => document.querySelector('#dag g.dag-node[data-state="RUNNING"]'), null,
    { timeout: 30_000 });
  await shot(page, 'workflow-running');
  await page.waitForFunction(() => document.querySelector('#workflow-state')?.dataset.state === 'COMPLETED', null,
    { timeout: 60_000 });
  const states = await page.locator('#dag g.dag-node').evaluateAll((gs) => gs.map((g) => g.dataset.state));
  assert.deepEqual(states, Array(branches + 1).fill('COMPLETED'));
  await assertNoReload(page);
  await shot(page, 'workflow');
  // A subtask's page shows its attempt (node, agent, start, end, outcome) and its history.
  await page.click('#dag g.dag-node[data-key="aggregate"]');
  // The attempts come from this node's samples (every 500 ms), so the page may open before the
  // sample that saw the attempt end; the live update brings it.
  await page.waitForFunction(() => {
    const rows = document.querySelectorAll('#attempts tbody tr');
    return rows.length > 0 && /completed/.test(rows[rows.length - 1].textContent);
  }, null, { timeout: 10_000 });
  assert.ok(await page.locator('#history tbody tr[data-state="COMPLETED"]').count() >= 1);
  assert.notEqual((await page.locator('#task-result').textContent()).trim(), '(none yet)');
  await shot(page, 'task-completed');
  await page.close();
});

test(`the task list with ${bulkTasks} tasks loads in under ${LIST_LOAD_MS_MAX} ms (median of five)`, async () => {
  assert.ok(bulkTasks >= 10_000, `MAOS_BULK_TASKS is ${bulkTasks}`);
  const page = await context.newPage();
  await page.goto(`${dashboards['1']}/tasks`); // warm: the assets are cached after this
  const loads = [];
  for (let i = 0; i < 5; i++) {
    await page.goto(`${dashboards['1']}/tasks`, { waitUntil: 'load' });
    const ms = await page.evaluate(() => {
      const [nav] = performance.getEntriesByType('navigation');
      return nav.loadEventEnd - nav.startTime;
    });
    loads.push(Math.round(ms * 10) / 10);
  }
  console.log(`task list load times with ${bulkTasks} tasks, ms: ${loads.join(', ')}`);
  const matching = Number(await page.locator('#task-count').getAttribute('data-matching'));
  assert.ok(matching >= bulkTasks, `the list counts ${matching} tasks`);
  assert.equal(await page.locator('#task-table tbody tr').count(), 50);
  // The median of five loads: one slow load on a busy 2-core CI machine is noise, not the page.
  const median = [...loads].sort((a, b) => a - b)[2];
  assert.ok(median < LIST_LOAD_MS_MAX, `the median load took ${median} ms: ${loads.join(', ')}`);
  // Filters and paging.
  await page.goto(`${dashboards['1']}/tasks?state=queued&type=bulk&priority=low&submitter=bulk-loader`);
  await assertReadOnlyNotice(page);
  const first = await page.locator('#task-table tbody tr').first().getAttribute('data-task-id');
  assert.ok(Number(await page.locator('#task-count').getAttribute('data-matching')) >= bulkTasks);
  await shot(page, 'tasks');
  await page.click('#page-older');
  await page.locator('#page-newest').waitFor();
  const second = await page.locator('#task-table tbody tr').first().getAttribute('data-task-id');
  assert.ok(second < first, `the older page starts at ${second}, after ${first}`);
  await page.goto(`${dashboards['1']}/tasks?priority=urgent`);
  assert.match(await page.locator('#problem').textContent(), /priority: "urgent" is not one of/);
  await page.close();
});

test('the agents page shows each node\'s pools and offers no actions', async () => {
  const page = await context.newPage();
  await page.goto(`${dashboards['2']}/agents`);
  await assertReadOnlyNotice(page);
  const nodes = await page.locator('#pools tbody tr').evaluateAll((rs) => [...new Set(rs.map((r) => r.dataset.node))]);
  assert.deepEqual(nodes.sort(), ['1', '2', '3']);
  assert.equal(await page.locator('main button, main form').count(), 0, 'an action is offered');
  await shot(page, 'agents');
  await page.close();
});

test('killing the leader shows the new one without a reload', async () => {
  const old = await leaderId();
  const watcher = ['1', '2', '3'].find((id) => id !== old);
  const page = await context.newPage();
  await page.goto(dashboards[watcher]);
  await page.waitForFunction((id) => document.querySelector('#leader')?.dataset.leaderId === id, old);
  await markNoReload(page);
  process.kill(pids[old], 'SIGKILL');
  killed.add(old);
  // The leader field is the watcher's view and each row is that node's own status, sampled
  // apart: wait until both show the new leader (a sample can land between its election and its
  // own status saying so).
  await page.waitForFunction((id) => {
    const leader = document.querySelector('#leader')?.dataset.leaderId;
    const row = document.querySelector(`#node-table tr[data-node-id="${id}"]`);
    const leaderRow = document.querySelector(`#node-table tr[data-node-id="${leader}"]`);
    return leader && leader !== id && row?.dataset.role === 'unreachable' && leaderRow?.dataset.role === 'leader';
  }, old, { timeout: 30_000 });
  const now = await page.locator('#leader').getAttribute('data-leader-id');
  assert.notEqual(now, old);
  assert.equal(await page.locator(`#node-table tr[data-node-id="${now}"]`).getAttribute('data-role'), 'leader');
  await page.locator('#events tr[data-kind="node-down"]').first().waitFor({ timeout: 10_000 });
  await assertNoReload(page);
  await shot(page, 'overview-failover');
  await page.close();
});
