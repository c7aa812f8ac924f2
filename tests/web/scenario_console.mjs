// An agent signs in, goes IDLE, gets an offer over the live stream (countdown running),
// accepts it, sees the task detail (masked customer, history, recommended cars), records
// the call and completes the task; the completed task is then in their list; signing out
// takes the agent offline.
// Env: CONSOLE_URL, AGENT_ID. Stdin: the id of the task the driver created for the agent.
import { BASE, emit, nextLine, run, shot } from "./browser.mjs";

const AGENT = process.env.AGENT_ID;
const MASKED = /^\d{3}\*{4}\d{4}$/;

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

await run("console", async ({ page: newPage }) => {
  const page = await newPage("agent");
  await page.goto(`${BASE}#/signin`);
  await page.getByTestId("signin-agent").fill(AGENT);
  await page.getByTestId("signin-submit").click();
  await page.getByTestId("signed-in").waitFor();
  await page.getByTestId("presence-IDLE").click();
  await page.locator('[data-testid="presence-IDLE"][aria-pressed="true"]').waitFor();
  await page.locator('[data-testid="stream-state"][data-state="live"]').waitFor();
  emit("ready");

  const taskId = (await nextLine()).trim();
  const card = page.locator(`[data-testid="offer-card"][data-task-id="${taskId}"]`);
  await card.waitFor();
  const masked = (await card.getByTestId("offer-customer").textContent()).trim();
  check(MASKED.test(masked), `offer shows a masked phone, got ${masked}`);
  const left = async () => parseFloat(await card.getByTestId("offer-countdown").textContent());
  const first = await left();
  await page.waitForFunction(
    ([id, before]) => {
      const el = document.querySelector(`[data-testid="offer-card"][data-task-id="${id}"] [data-testid="offer-countdown"]`);
      return el && parseFloat(el.textContent) < before;
    },
    [taskId, first],
  );
  emit("countdown", { first, later: await left() });
  await shot(page, "console-offer");

  await card.getByTestId("offer-accept").click();
  await page.waitForURL(`**#/tasks/${taskId}`);
  const detail = page.getByTestId("task-detail");
  await detail.waitFor();
  await page.locator('[data-testid="detail-status"]', { hasText: "in progress" }).waitFor();
  const phone = (await page.getByTestId("customer-phone").textContent()).trim();
  check(MASKED.test(phone), `detail shows a masked phone, got ${phone}`);
  const history = await page.getByTestId("history").locator("tbody tr").allTextContents();
  check(history.some((r) => r.includes("OFFERED")), `history has OFFERED: ${history}`);
  check(history.some((r) => r.includes("ACCEPTED")), `history has ACCEPTED: ${history}`);
  await page.locator('[data-testid="car"], [data-testid="recs-unavailable"]').first().waitFor();
  const cars = await page.getByTestId("car").count();
  emit("detail", { phone, history, cars });
  await shot(page, "console-task-detail");

  await page.getByTestId("call-outcome").selectOption({ label: "connected" });
  await page.getByTestId("call-duration").fill("95");
  await page.getByTestId("call-note").fill("asked about financing");
  await page.getByTestId("record-call").click();
  const call = page.getByTestId("calls").locator("tbody tr", { hasText: "asked about financing" });
  await call.waitFor();
  const callRow = await call.textContent();
  check(callRow.includes("connected") && callRow.includes("95 s"), `call row: ${callRow}`);
  emit("call", { row: callRow });
  await shot(page, "console-task-call");

  await page.getByTestId("complete-note").fill("test drive booked");
  await page.getByTestId("complete-task").click();
  await page.locator('[data-testid="detail-status"]', { hasText: "completed" }).waitFor();
  emit("completed", { taskId });

  await page.goto(`${BASE}#/console`);
  await page.getByTestId("filter-status").selectOption({ label: "completed" });
  const row = page.locator(`[data-testid="task-row"][data-task-id="${taskId}"]`);
  await row.waitFor();
  check((await row.getByTestId("task-status").textContent()) === "completed", "row is completed");
  await shot(page, "console-task-list");

  await page.getByTestId("signout").click();
  await page.getByTestId("signin-agent").waitFor();
  emit("signed-out");
});
