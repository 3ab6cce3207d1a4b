// Drives the status page in headless Chromium for tests/ui.rs, in steps the Rust test
// paces over stdin/stdout: it prints what it saw, and waits for a line before the next.
//   node tests/ui/page.mjs BASE_URL SCREENSHOT_DIR
import { chromium } from "playwright-core";
import readline from "node:readline";

const [base, shots] = process.argv.slice(2);
const rl = readline.createInterface({ input: process.stdin });
const lines = rl[Symbol.asyncIterator]();
const next = async () => (await lines.next()).value;
const say = (m) => process.stdout.write(m + "\n");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/ui");
  const rows = '[data-chain="main"] tbody tr';
  await page.waitForSelector(rows);
  say("ORDER " + (await page.$$eval(rows, (trs) => trs.map((t) => t.dataset.model))).join(","));
  say("IDLE " + JSON.stringify(await page.textContent("#chains-body")).includes("No traffic yet"));
  say("NOEVENTS " + (await page.textContent("#events-body")).includes("No fallbacks yet"));
  await page.screenshot({ path: `${shots}/1-no-traffic.png`, fullPage: true });

  say("READY");
  await next(); // the primary now fails
  const started = Date.now();
  await page.waitForSelector(`${rows}[data-model="primary"][data-state="open"]`, { timeout: 5000 });
  say("OPEN " + (Date.now() - started));
  say("ORDER " + (await page.$$eval(rows, (trs) => trs.map((t) => t.dataset.model))).join(","));
  await page.waitForSelector('#events-body tr[data-to="secondary"]', { timeout: 5000 });
  say("EVENT " + (await page.textContent("#events-body tbody tr")).replace(/\s+/g, " "));
  await page.screenshot({ path: `${shots}/2-breaker-open.png`, fullPage: true });

  say("WAITING");
  await next(); // the primary answers again and its breaker has closed
  const recovering = Date.now();
  await page.waitForSelector(`${rows}[data-model="primary"][data-state="closed"]`, { timeout: 5000 });
  say("CLOSED " + (Date.now() - recovering));
  // The cost section appears within the 10 s report refresh.
  await page.waitForSelector("#cost-body table", { timeout: 12000 });
  await page.screenshot({ path: `${shots}/3-recovered.png`, fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: `${shots}/4-phone.png`, fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  say("PHONE_OVERFLOW " + overflow);
} catch (e) {
  say("FAILED " + String(e).split("\n")[0]);
} finally {
  say("ERRORS " + JSON.stringify(errors));
  await browser.close();
  rl.close();
}
