// The agent's task list: paging (10 a page, forward and back) and filters (status,
// category, city). Env: CONSOLE_URL, AGENT_ID. Stdin: once the driver has had 12 tasks
// offered to the agent, a JSON line {"shanghai": how many are in shanghai, "ids": the 12
// task ids newest first, as the service lists them}; then the id of a task never offered
// to the agent (the service must not show it: scoped by the token).
// The list reloads when offers arrive, so the scenario waits for what the page must come
// to show (with a deadline) instead of reading it at one instant.
import { BASE, emit, nextLine, run, shot } from "./browser.mjs";

const AGENT = process.env.AGENT_ID;

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

await run("tasks", async ({ page: newPage }) => {
  const page = await newPage("agent");
  await page.goto(`${BASE}#/signin`);
  await page.getByTestId("signin-agent").fill(AGENT);
  await page.getByTestId("signin-submit").click();
  await page.getByTestId("signed-in").waitFor();
  await page.getByTestId("presence-IDLE").click();
  await page.locator('[data-testid="stream-state"][data-state="live"]').waitFor();
  emit("ready");
  const given = JSON.parse(await nextLine());
  const shanghai = given.shanghai;
  const expected = given.ids.map(String);

  const rows = page.getByTestId("task-row");
  const ids = async () => rows.evaluateAll((els) => els.map((e) => e.dataset.taskId));
  // page n shows exactly `want` (ids in order), its number, and nothing else
  const pageShows = async (n, want, what) => {
    try {
      await page.waitForFunction(
        ([n, want]) => {
          const label = document.querySelector('[data-testid="page-number"]');
          const got = [...document.querySelectorAll('[data-testid="task-row"]')].map((e) => e.dataset.taskId);
          return label?.textContent?.trim() === `page ${n}` && JSON.stringify(got) === JSON.stringify(want);
        },
        [n, want],
        { timeout: 30_000 },
      );
    } catch {
      check(false, `${what}: want page ${n} = ${want}, shows ${await ids()}`);
    }
    return ids();
  };
  await page.getByTestId("filter-status").selectOption({ label: "assigned" });
  const first = await pageShows(1, expected.slice(0, 10), "first page");
  await shot(page, "console-task-list-paged");
  check(await page.getByTestId("page-prev").isDisabled(), "no previous page on page 1");
  await page.getByTestId("page-next").click();
  const second = await pageShows(2, expected.slice(10), "second page");
  check(await page.getByTestId("page-next").isDisabled(), "page 2 is the last");
  await page.getByTestId("page-prev").click();
  const back = await pageShows(1, expected.slice(0, 10), "back to the same first page");
  emit("paged", { first: first.length, second: second.length, back: back.length, ids: [...first, ...second] });

  await page.getByTestId("filter-city").fill("shanghai");
  await page.getByTestId("filter-city").press("Enter");
  await page.waitForFunction(
    (n) => document.querySelectorAll('[data-testid="task-row"]').length === n,
    shanghai,
  );
  const cities = await rows.locator("td:nth-child(4)").allTextContents();
  check(cities.every((c) => c === "shanghai"), `only shanghai: ${cities}`);
  await page.getByTestId("filter-category").selectOption({ label: "revisit" });
  await page.getByText("No task matches.").waitFor();
  emit("filtered", { shanghai: cities.length });

  const foreign = (await nextLine()).trim();
  await page.goto(`${BASE}#/tasks/${foreign}`);
  const error = await page.getByTestId("task-error").textContent();
  check(error.startsWith("NotFound"), `another agent's task is not shown: ${error}`);
  emit("scoped", { error });
});
