// Shared by the browser scenarios: Debian's chromium through playwright-core (from
// web/node_modules), headless, no sandbox (the tests run as root), no background network
// (this machine has none: Chromium's own connections would be refused), and a fresh
// profile per run (playwright-core makes a new temporary --user-data-dir per launch and
// removes it on close). Scenarios talk to their pytest driver with JSON lines on stdout and
// plain lines on stdin.
import { createRequire } from "node:module";
import path from "node:path";
import { createInterface } from "node:readline";

const require = createRequire(path.join(process.env.CRM_WEB_DIR, "package.json"));
const { chromium } = require("playwright-core");

export const BASE = process.env.CONSOLE_URL;
export const ARTIFACTS = process.env.ARTIFACTS;

export function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

const lines = createInterface({ input: process.stdin });
const pending = [];
const waiting = [];
lines.on("line", (l) => (waiting.length ? waiting.shift()(l) : pending.push(l)));

/** The next line the driver sends on stdin. */
export function nextLine() {
  return pending.length ? Promise.resolve(pending.shift()) : new Promise((r) => waiting.push(r));
}

export async function launch() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const close = () => browser.close();
  return { browser, close };
}

/** A new page that reports its console errors and failed requests as events. */
export async function newPage(browser, name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  page.on("pageerror", (err) => emit("page-error", { page: name, message: String(err) }));
  return page;
}

export async function shot(page, name) {
  const file = path.join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  emit("screenshot", { name, file });
}

/** Runs a scenario: any exception becomes a `failed` event (with a screenshot). */
export async function run(name, body) {
  const { browser, close } = await launch();
  const pages = [];
  try {
    await body({ browser, page: async (n) => { const p = await newPage(browser, n); pages.push(p); return p; } });
    emit("done");
  } catch (err) {
    for (const [i, p] of pages.entries()) {
      await p.screenshot({ path: path.join(ARTIFACTS, `${name}-failed-${i}.png`), fullPage: true }).catch(() => {});
    }
    emit("failed", { message: String(err?.stack ?? err) });
    process.exitCode = 1;
  } finally {
    await close();
    lines.close();
  }
}
