/**
 * Runs browser/page.ts in headless Chromium:
 * `node dist/scripts/browser-smoke.js <chromium executable> <edge base URL> <page URL>...`.
 * Opens each page (a fresh profile each), calls window.fitTrackerSmoke(edge) in it and prints one
 * JSON line: per page, what the SDK saw and the errors the browser logged (CORS refusals among them).
 * tests/clients/test_typescript_client.py serves the page from an allowed and a disallowed origin.
 */
import { chromium } from "playwright-core";

import type { SmokeResult } from "../browser/page.js";

interface PageRun {
  url: string;
  result: SmokeResult;
  consoleErrors: string[];
}

async function main(executablePath: string, edgeUrl: string, pages: string[]): Promise<PageRun[]> {
  // Chromium refuses to sandbox itself as root (containers, CI); elsewhere it keeps its sandbox.
  const args = process.getuid?.() === 0 ? ["--no-sandbox"] : [];
  const browser = await chromium.launch({ executablePath, headless: true, args, timeout: 20_000 });
  try {
    const runs: PageRun[] = [];
    for (const url of pages) {
      const context = await browser.newContext();
      const page = await context.newPage();
      page.setDefaultTimeout(15_000);
      const consoleErrors: string[] = [];
      page.on("console", (message) => {
        if (message.type() === "error") consoleErrors.push(message.text());
      });
      await page.goto(url);
      await page.waitForFunction(() => typeof window.fitTrackerSmoke === "function");
      const result = await page.evaluate((edge) => window.fitTrackerSmoke(edge), edgeUrl);
      runs.push({ url, result, consoleErrors });
      await context.close();
    }
    return runs;
  } finally {
    await browser.close();
  }
}

const [executablePath, edgeUrl, ...pages] = process.argv.slice(2);
if (!executablePath || !edgeUrl || pages.length === 0) {
  console.error("usage: node dist/scripts/browser-smoke.js <chromium> <edge base URL> <page URL>...");
  process.exit(2);
}
main(executablePath, edgeUrl, pages).then(
  (runs) => console.log(JSON.stringify({ runs })),
  (err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  },
);
