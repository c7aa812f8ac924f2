// Offers the agent does not take: one runs past its accept deadline while the agent is
// busy (the card says so and the service recycles the task; a busy agent gets no new
// offer, so the lost one is not offered again at once), another is rejected after the
// agent went on a break.
// Env: CONSOLE_URL, AGENT_ID. Stdin: the id of the task to let expire, then (after the
// `expired` event) the id of the task to reject.
import { BASE, emit, nextLine, run, shot } from "./browser.mjs";

const AGENT = process.env.AGENT_ID;

await run("offers", async ({ page: newPage }) => {
  const page = await newPage("agent");
  await page.goto(`${BASE}#/signin`);
  await page.getByTestId("signin-agent").fill(AGENT);
  await page.getByTestId("signin-submit").click();
  await page.getByTestId("signed-in").waitFor();
  await page.getByTestId("presence-IDLE").click();
  await page.locator('[data-testid="stream-state"][data-state="live"]').waitFor();
  emit("ready");

  const first = (await nextLine()).trim();
  await page.locator(`[data-testid="offer-card"][data-task-id="${first}"]`).waitFor();
  await page.getByTestId("presence-BUSY").click();
  await page.locator('[data-testid="presence-BUSY"][aria-pressed="true"]').waitFor();
  const expired = page.locator(`[data-testid="offer-card"][data-task-id="${first}"].expired`);
  await expired.waitFor({ timeout: 30_000 });
  const text = await expired.getByTestId("offer-countdown").textContent();
  await shot(page, "console-offer-expired");
  emit("expired", { text, acceptDisabled: await expired.getByTestId("offer-accept").isDisabled() });

  const second = (await nextLine()).trim();
  await page.getByTestId("presence-IDLE").click();
  const card = page.locator(`[data-testid="offer-card"][data-task-id="${second}"]:not(.expired)`);
  await card.waitFor();
  await page.getByTestId("presence-BREAK").click();
  await page.locator('[data-testid="presence-BREAK"][aria-pressed="true"]').waitFor();
  await card.getByTestId("offer-reject").click();
  await page.locator(`[data-testid="offer-card"][data-task-id="${second}"]`).waitFor({ state: "detached" });
  emit("rejected");
});
