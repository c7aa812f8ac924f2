// Config review: ops open assignment/SALE, change it twice (each change validated by the
// service's parser and shown in the history with its diff and author), see an invalid
// value refused with the field named, watch the running assignment instance apply the
// new revision, roll back to the first change, then roll a candidate out to 80% of the
// instances and see the live instance (bucket below 80) apply it. Env: CONSOLE_URL,
// EXPECT_INSTANCE (a live instance that acknowledges what it applied). Stdin: a line
// before the rollout.
import { BASE, emit, nextLine, run, shot } from "./browser.mjs";

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

await run("config", async ({ page: newPage }) => {
  const page = await newPage("ops");
  await page.goto(`${BASE}#/config`);
  await page.getByTestId("config-author").fill("ops-web");
  await page.getByTestId("config-author").press("Tab");
  await page.getByTestId("config-key-assignment-SALE").click();
  const current = page.getByTestId("config-current");
  await current.waitFor();
  const revision = async () => BigInt(await current.getAttribute("data-revision"));
  const r0 = await revision();

  const edit = async (change) => {
    const before = await revision();
    const value = JSON.parse(await page.getByTestId("config-editor").inputValue());
    change(value);
    await page.getByTestId("config-editor").fill(JSON.stringify(value, null, 2));
    await page.getByTestId("config-save").click();
    await page.waitForFunction(
      (b) => BigInt(document.querySelector('[data-testid="config-current"]')?.dataset.revision ?? "0") > BigInt(b),
      before.toString(),
    );
    return revision();
  };
  const r1 = await edit((v) => (v.accept_timeout_s = 45));
  const r2 = await edit((v) => {
    v.accept_timeout_s = 50;
    v.weights = { ...(v.weights ?? {}), star: 500 };
  });
  check(r0 < r1 && r1 < r2, `revisions grow: ${r0} ${r1} ${r2}`);
  const newest = page.getByTestId("config-version").first();
  check((await newest.getAttribute("data-revision")) === r2.toString(), "newest version first");
  check((await newest.getByTestId("config-version-author").textContent()) === "ops-web", "author shown");
  const changes = await newest.getByTestId("config-change").allTextContents();
  check(changes.some((c) => c.includes("accept_timeout_s") && c.includes("45") && c.includes("50")), `diff: ${changes}`);
  check(changes.some((c) => c.includes("weights") && c.includes("500")), `diff names weights: ${changes}`);
  emit("changed", { r0: String(r0), r1: String(r1), r2: String(r2), changes });

  // the running assignment instance acknowledges the new stable revision
  const applied = page
    .locator('[data-testid="config-instance"]', { hasText: process.env.EXPECT_INSTANCE })
    .filter({ hasText: "stable" })
    .filter({ hasText: String(r2) });
  for (let i = 0; i < 100 && !(await applied.count()); i++) {
    await page.getByTestId("config-refresh").click();
    await page.locator(`[data-testid="config-current"][data-revision="${r2}"]`).waitFor();
    await page.waitForTimeout(200);
  }
  check((await applied.count()) > 0, "an instance applied the new stable revision");
  const instance = (await applied.first().locator("td").first().textContent()).trim();
  await shot(page, "config-review");
  emit("applied", { instance });

  // refused: the service's parser names the field
  const value = JSON.parse(await page.getByTestId("config-editor").inputValue());
  value.accept_timeout_s = -5;
  await page.getByTestId("config-editor").fill(JSON.stringify(value, null, 2));
  await page.getByTestId("config-save").click();
  const fieldError = page.getByTestId("config-field-error").first();
  await fieldError.waitFor();
  const refused = await page.getByTestId("config-field-error").allTextContents();
  check((await revision()) === r2, "a refused value changes nothing");
  await shot(page, "config-refused");
  emit("refused", { fields: refused });

  // roll back to the first change
  await page.locator(`[data-testid="config-version"][data-revision="${r1}"] [data-testid="config-rollback"]`).click();
  await page.waitForFunction(
    (b) => BigInt(document.querySelector('[data-testid="config-current"]')?.dataset.revision ?? "0") > BigInt(b),
    r2.toString(),
  );
  const now = JSON.parse(await page.getByTestId("config-current-value").textContent());
  check(now.accept_timeout_s === 45, `rolled back to 45: ${JSON.stringify(now)}`);
  emit("rolled-back", { revision: String(await revision()) });

  await nextLine();

  // a rollout: the candidate goes to the instances whose bucket is below 80
  const stable = await revision();
  const cand = JSON.parse(await page.getByTestId("config-editor").inputValue());
  cand.accept_timeout_s = 30;
  await page.getByTestId("config-editor").fill(JSON.stringify(cand, null, 2));
  await page.getByTestId("config-rollout-percent").fill("80");
  await page.getByTestId("config-save").click();
  const rolloutText = page.getByTestId("config-rollout").filter({ hasText: "rolling out to 80%" });
  await rolloutText.waitFor();
  check((await revision()) === stable, "a rollout leaves the stable value alone");
  const onCandidate = page
    .locator('[data-testid="config-instance"]', { hasText: process.env.EXPECT_INSTANCE })
    .filter({ hasText: "rollout candidate" });
  for (let i = 0; i < 100 && !(await onCandidate.count()); i++) {
    await page.getByTestId("config-refresh").click();
    await rolloutText.waitFor();
    await page.waitForTimeout(200);
  }
  check((await onCandidate.count()) > 0, "the instance applied the rollout candidate");
  await shot(page, "config-rollout");
  emit("rollout", { text: await rolloutText.locator("p").first().textContent() });
});
