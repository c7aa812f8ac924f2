// The agent console: sign in, presence, live offers (server stream) with a countdown to
// the accept deadline, the agent's task list (filters, paging) and the task detail.
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { assignment, describeError, isCode, loadSession, saveSession, type Session } from "./api";
import { h, mount, select } from "./dom";
import {
  categoryLabel,
  enumOptions,
  lineLabel,
  ms,
  presenceLabel,
  statusLabel,
  km,
  when,
  yuan,
} from "./format";
import {
  CallOutcome,
  CallType,
  Category,
  Presence,
  Status,
  TelephonyProvider,
  type GetTaskResponse,
  type Offer,
  type Task,
  type TaskEvent,
} from "./gen/crm/assignment/v1/assignment_pb";

const PAGE_SIZE = 10;

export function navigate(hash: string): void {
  if (window.location.hash === hash) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else window.location.hash = hash;
}

// ---------------------------------------------------------------- sign in

export function signInPage(root: HTMLElement, onSignedIn: () => void): void {
  const input = h("input", {
    type: "number",
    min: 1,
    placeholder: "e.g. 101",
    "data-testid": "signin-agent",
    required: true,
  });
  const error = h("p", { class: "error", "data-testid": "signin-error" });
  const form = h(
    "form",
    { class: "card signin" },
    h("h2", {}, "Sign in"),
    h("label", {}, "Agent id ", input),
    h("button", { type: "submit", "data-testid": "signin-submit" }, "Sign in"),
    error,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    try {
      const session = await signIn(BigInt(input.value));
      saveSession(session);
      onSignedIn();
    } catch (err) {
      error.textContent = isCode(err, Code.NotFound)
        ? `No agent ${input.value}.`
        : describeError(err);
    }
  });
  mount(root, form);
  input.focus();
}

/** SignIn returns a bearer token naming the agent: every later call carries it and the
 * service scopes it to that agent (own offers, tasks and presence only). */
async function signIn(agentId: bigint): Promise<Session> {
  const resp = await assignment.signIn({ agentId });
  return {
    agentId,
    name: resp.agent?.name || `agent ${agentId}`,
    token: resp.token,
    expiresAt: ms(resp.expiresAt),
  };
}

// ---------------------------------------------------------------- the agent's side panel

/** Presence switch and live offers: lives as long as the agent is signed in. */
export class AgentPanel {
  readonly el = h("aside", { class: "panel" });
  private presence: Presence = Presence.UNSPECIFIED;
  private offers = new Map<bigint, Offer>();
  private abort = new AbortController();
  private ticker = 0;
  private readonly offersEl = h("div", { class: "offers", "data-testid": "offers" });
  private readonly presenceEl = h("div", { class: "presence", "data-testid": "presence" });
  private readonly streamEl = h("p", { class: "muted", "data-testid": "stream-state" });
  private readonly messageEl = h("p", { class: "error", "data-testid": "panel-error" });

  constructor(
    readonly session: Session,
    private readonly onChange: () => void,
  ) {
    mount(
      this.el,
      h("h3", {}, "Presence"),
      this.presenceEl,
      h("h3", {}, "Offers"),
      this.streamEl,
      this.offersEl,
      this.messageEl,
    );
  }

  async start(): Promise<void> {
    try {
      const { agent } = await assignment.getAgent({ id: this.session.agentId });
      this.presence = agent?.presence ?? Presence.OFFLINE;
    } catch (err) {
      this.messageEl.textContent = describeError(err);
    }
    this.renderPresence();
    this.ticker = window.setInterval(() => this.tick(), 200);
    void this.stream();
  }

  stop(): void {
    this.abort.abort();
    window.clearInterval(this.ticker);
  }

  /** Keeps the offer stream open, reconnecting with back-off when it breaks. */
  private async stream(): Promise<void> {
    let backoff = 500;
    while (!this.abort.signal.aborted) {
      this.setStreamState("connecting");
      try {
        const stream = assignment.streamOffers(
          { agentId: this.session.agentId },
          { signal: this.abort.signal },
        );
        this.setStreamState("live");
        for await (const msg of stream) {
          backoff = 500;
          if (msg.offer?.task) {
            this.offers.set(msg.offer.task.id, msg.offer);
            this.renderOffers();
            this.onChange(); // the task list shows the newly reserved task
          }
        }
      } catch (err) {
        if (this.abort.signal.aborted) return;
        if (isCode(err, Code.Unauthenticated)) {
          this.messageEl.textContent = "Session expired: sign in again.";
          this.setStreamState("closed");
          return;
        }
        this.messageEl.textContent = `Offer stream: ${describeError(err)}`;
      }
      if (this.abort.signal.aborted) return;
      this.setStreamState(`reconnecting in ${(backoff / 1000).toFixed(1)} s`);
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 10_000);
    }
  }

  private setStreamState(state: string): void {
    this.streamEl.textContent = `Offer stream: ${state}`;
    this.streamEl.dataset.state = state.split(" ")[0];
  }

  private renderPresence(): void {
    const options = [Presence.IDLE, Presence.BUSY, Presence.BREAK, Presence.OFFLINE];
    mount(
      this.presenceEl,
      options.map((p) =>
        h(
          "button",
          {
            class: p === this.presence ? "seg active" : "seg",
            "data-testid": `presence-${Presence[p]}`,
            "aria-pressed": String(p === this.presence),
            onclick: () => void this.setPresence(p),
          },
          presenceLabel(p),
        ),
      ),
    );
  }

  private async setPresence(p: Presence): Promise<void> {
    this.messageEl.textContent = "";
    try {
      const { agent } = await assignment.setPresence({ agentId: this.session.agentId, presence: p });
      this.presence = agent?.presence ?? p;
    } catch (err) {
      this.messageEl.textContent = describeError(err);
    }
    this.renderPresence();
  }

  private renderOffers(): void {
    const cards = [...this.offers.values()].map((o) => this.offerCard(o));
    mount(this.offersEl, cards.length ? cards : h("p", { class: "muted" }, "No offer right now."));
    this.tick();
  }

  private offerCard(offer: Offer): HTMLElement {
    const task = offer.task!;
    const deadline = ms(offer.deadline);
    const total = Math.max(1, deadline - Date.now());
    const card = h(
      "div",
      { class: "card offer", "data-testid": "offer-card", "data-task-id": task.id.toString() },
      h("div", { class: "offer-head" }, h("strong", {}, `Task #${task.id}`), " ", categoryLabel(task.category)),
      h(
        "div",
        {},
        `${task.city} · ${task.brands.join(", ") || "no brand"} · customer `,
        h("span", { "data-testid": "offer-customer" }, offer.customer?.phone?.masked ?? "?"),
        offer.customer?.star ? h("span", { class: "star", title: "star customer" }, " ★") : null,
      ),
      h("div", { class: "countdown" }, h("div", { class: "bar" })),
      h("div", { class: "muted", "data-testid": "offer-countdown" }),
      h(
        "div",
        { class: "actions" },
        h("button", { "data-testid": "offer-accept", onclick: () => void this.accept(task) }, "Accept"),
        h(
          "button",
          { class: "secondary", "data-testid": "offer-reject", onclick: () => void this.reject(task) },
          "Reject",
        ),
      ),
    );
    card.dataset.deadline = String(deadline);
    card.dataset.total = String(total);
    return card;
  }

  /** Countdowns move; an offer past its deadline is marked lost (the service recycles it). */
  private tick(): void {
    for (const card of this.offersEl.querySelectorAll<HTMLElement>("[data-testid=offer-card]")) {
      const left = Number(card.dataset.deadline) - Date.now();
      const bar = card.querySelector<HTMLElement>(".bar")!;
      const text = card.querySelector<HTMLElement>("[data-testid=offer-countdown]")!;
      bar.style.width = `${Math.max(0, (100 * left) / Number(card.dataset.total))}%`;
      if (left > 0) {
        text.textContent = `${(left / 1000).toFixed(1)} s left to accept`;
      } else if (!card.classList.contains("expired")) {
        card.classList.add("expired");
        text.textContent = "Deadline passed: the task went back to its queue.";
        card.querySelectorAll("button").forEach((b) => (b.disabled = true));
        const id = BigInt(card.dataset.taskId!);
        const lost = this.offers.get(id);
        setTimeout(() => {
          // the task may have been offered again meanwhile: only drop this very offer
          if (this.offers.get(id) === lost) {
            this.offers.delete(id);
            this.renderOffers();
          }
          this.onChange(); // the list shows the task's new status
        }, 3000);
      }
    }
  }

  private async accept(task: Task): Promise<void> {
    this.messageEl.textContent = "";
    try {
      await assignment.acceptTask({ taskId: task.id, agentId: this.session.agentId });
      this.offers.delete(task.id);
      this.renderOffers();
      this.onChange();
      navigate(`#/tasks/${task.id}`);
    } catch (err) {
      this.messageEl.textContent = `Accept task #${task.id}: ${describeError(err)}`;
      if (isCode(err, Code.FailedPrecondition)) {
        this.offers.delete(task.id);
        this.renderOffers();
      }
    }
  }

  private async reject(task: Task): Promise<void> {
    this.messageEl.textContent = "";
    try {
      await assignment.rejectTask({ taskId: task.id, agentId: this.session.agentId, reason: "rejected at the console" });
    } catch (err) {
      this.messageEl.textContent = `Reject task #${task.id}: ${describeError(err)}`;
    }
    this.offers.delete(task.id);
    this.renderOffers();
    this.onChange();
  }
}

// ---------------------------------------------------------------- task list

interface ListState {
  status: string;
  category: string;
  city: string;
  tokens: string[]; // page tokens of the pages before the current one ("" = first)
  token: string;
}

const listState: ListState = { status: "", category: "", city: "", tokens: [], token: "" };
// Only the latest list request renders: responses can come back out of order (a filter
// change racing a refresh after an offer), and an older one must not overwrite a newer.
let listSeq = 0;
let activeReload: (() => boolean) | null = null;

/** Reloads the task list on screen in place (rows stay until the new page arrives);
 * false when no list is on screen. */
export function reloadTaskList(): boolean {
  return activeReload?.() ?? false;
}

export async function taskListPage(root: HTMLElement, session: Session): Promise<void> {
  const table = h("tbody", { "data-testid": "task-rows" });
  const pager = h("div", { class: "pager" });
  const error = h("p", { class: "error" });
  const reload = () => void load();
  activeReload = () => {
    if (!table.isConnected) return false;
    reload();
    return true;
  };
  const filters = h(
    "div",
    { class: "filters" },
    h(
      "label",
      {},
      "Status ",
      select(
        "filter-status",
        [["", "any"], ...enumOptions(Status as never, (v) => statusLabel(v))],
        listState.status,
        (v) => {
          listState.status = v;
          resetPaging();
          reload();
        },
      ),
    ),
    h(
      "label",
      {},
      "Category ",
      select(
        "filter-category",
        [["", "any"], ...enumOptions(Category as never, (v) => categoryLabel(v))],
        listState.category,
        (v) => {
          listState.category = v;
          resetPaging();
          reload();
        },
      ),
    ),
    h(
      "label",
      {},
      "City ",
      h("input", {
        "data-testid": "filter-city",
        value: listState.city,
        placeholder: "any",
        onchange: (ev: Event) => {
          listState.city = (ev.target as HTMLInputElement).value.trim().toLowerCase();
          resetPaging();
          reload();
        },
      }),
    ),
    h("button", { class: "secondary", "data-testid": "tasks-refresh", onclick: reload }, "Refresh"),
  );
  mount(
    root,
    h(
      "section",
      { class: "card" },
      h("h2", {}, "My tasks"),
      filters,
      h(
        "table",
        { class: "tasks" },
        h(
          "thead",
          {},
          h("tr", {}, ["Task", "Status", "Category", "City", "Brands", "Priority", "Created"].map((c) => h("th", {}, c))),
        ),
        table,
      ),
      pager,
      error,
    ),
  );

  async function load(): Promise<void> {
    const seq = ++listSeq;
    try {
      const resp = await assignment.listTasks({
        agentId: session.agentId,
        statuses: listState.status ? [Number(listState.status)] : [],
        category: listState.category ? Number(listState.category) : Category.UNSPECIFIED,
        city: listState.city,
        page: { pageSize: PAGE_SIZE, pageToken: listState.token },
      });
      if (seq !== listSeq) return; // a newer request is on its way
      error.textContent = "";
      mount(
        table,
        resp.tasks.length
          ? resp.tasks.map((t) =>
              h(
                "tr",
                {
                  class: "clickable",
                  "data-testid": "task-row",
                  "data-task-id": t.id.toString(),
                  onclick: () => navigate(`#/tasks/${t.id}`),
                },
                h("td", {}, h("a", { href: `#/tasks/${t.id}` }, `#${t.id}`)),
                h("td", {}, h("span", { class: `badge s${t.status}`, "data-testid": "task-status" }, statusLabel(t.status))),
                h("td", {}, categoryLabel(t.category)),
                h("td", {}, t.city),
                h("td", {}, t.brands.join(", ")),
                h("td", {}, t.priority),
                h("td", {}, when(t.createdAt)),
              ),
            )
          : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No task matches.")),
      );
      const next = resp.page?.nextPageToken ?? "";
      mount(
        pager,
        h(
          "button",
          {
            class: "secondary",
            "data-testid": "page-prev",
            disabled: listState.tokens.length === 0,
            onclick: () => {
              listState.token = listState.tokens.pop() ?? "";
              reload();
            },
          },
          "← Previous",
        ),
        h("span", { class: "muted", "data-testid": "page-number" }, ` page ${listState.tokens.length + 1} `),
        h(
          "button",
          {
            class: "secondary",
            "data-testid": "page-next",
            disabled: !next,
            onclick: () => {
              listState.tokens.push(listState.token);
              listState.token = next;
              reload();
            },
          },
          "Next →",
        ),
      );
    } catch (err) {
      if (seq === listSeq) error.textContent = describeError(err);
    }
  }
  await load();
}

function resetPaging(): void {
  listState.tokens = [];
  listState.token = "";
}

// ---------------------------------------------------------------- task detail

export async function taskDetailPage(root: HTMLElement, session: Session, id: bigint, onChange: () => void): Promise<void> {
  let detail: GetTaskResponse;
  try {
    detail = await assignment.getTask({ id });
  } catch (err) {
    mount(
      root,
      h(
        "section",
        { class: "card" },
        h("a", { href: "#/console" }, "← My tasks"),
        h("p", { class: "error", "data-testid": "task-error" }, describeError(err)),
      ),
    );
    return;
  }
  const task = detail.task!;
  const rerender = () => {
    onChange();
    void taskDetailPage(root, session, id, onChange);
  };
  const customer = detail.customer;
  mount(
    root,
    h(
      "section",
      { class: "card detail", "data-testid": "task-detail", "data-task-id": task.id.toString() },
      h("a", { href: "#/console" }, "← My tasks"),
      h(
        "h2",
        {},
        `Task #${task.id} `,
        h("span", { class: `badge s${task.status}`, "data-testid": "detail-status" }, statusLabel(task.status)),
      ),
      h(
        "dl",
        { class: "facts" },
        fact("Business line", lineLabel(task.businessLine)),
        fact("Category", categoryLabel(task.category)),
        fact("City", task.city),
        fact("Brands", task.brands.join(", ") || "-"),
        fact("Priority", String(task.priority)),
        fact("Created", when(task.createdAt)),
        fact("Due", when(task.dueAt)),
        fact("Recycled", String(task.recycleCount)),
        task.parentTaskId ? fact("Follows up", `#${task.parentTaskId}`) : null,
      ),
      h("h3", {}, "Customer"),
      h(
        "p",
        {},
        h("span", { class: "phone", "data-testid": "customer-phone" }, customer?.phone?.masked ?? "?"),
        customer?.star ? h("span", { class: "star" }, " ★ star customer") : null,
      ),
      actions(task, session, detail.history, rerender),
      h("h3", {}, "Clues"),
      table(
        ["Clue", "Source", "City", "Cars asked about", "Budget", "At"],
        detail.clues.map((c) => [
          `#${c.id}`,
          c.source,
          c.city,
          c.intentCarIds.map((x) => `#${x}`).join(", ") || "-",
          c.budgetMaxYuan ? `${yuan(c.budgetMinYuan)} – ${yuan(c.budgetMaxYuan)}` : "-",
          when(c.createdAt),
        ]),
        "clues",
      ),
      h("h3", {}, "Call records"),
      table(
        ["Started", "Type", "Provider", "Duration", "Outcome", "Agent", "Note"],
        detail.calls.map((c) => [
          when(c.startedAt),
          enumName(CallType, c.callType),
          enumName(TelephonyProvider, c.provider),
          `${c.durationSeconds} s`,
          enumName(CallOutcome, c.outcome),
          `#${c.agentId}`,
          c.note,
        ]),
        "calls",
      ),
      h("h3", {}, "History"),
      table(
        ["At", "Event", "From", "To", "Agent", "Reason"],
        detail.history.map((e) => [
          when(e.at),
          e.kind,
          e.fromStatus ? statusLabel(e.fromStatus) : "-",
          statusLabel(e.toStatus),
          e.agentId ? `#${e.agentId}` : "-",
          e.reason || "",
        ]),
        "history",
      ),
      h("h3", {}, "Recommended cars"),
      recommendations(detail),
    ),
  );
}

function enumName(e: Record<number, string>, v: number): string {
  return (e[v] ?? "?").toLowerCase().replace(/_/g, " ");
}

function fact(term: string, value: string): HTMLElement[] {
  return [h("dt", {}, term), h("dd", {}, value)];
}

function table(head: string[], rows: (string | Node)[][], testid: string): HTMLElement {
  return h(
    "table",
    { "data-testid": testid },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      rows.length
        ? rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))
        : h("tr", {}, h("td", { colspan: head.length, class: "muted" }, "None.")),
    ),
  );
}

function recommendations(detail: GetTaskResponse): HTMLElement {
  const recs = detail.recommendations;
  if (!recs?.available) {
    return h(
      "p",
      { class: "muted", "data-testid": "recs-unavailable" },
      `Unavailable (${recs?.unavailableReason || "unknown"}); the rest of the task is up to date.`,
    );
  }
  return h(
    "div",
    { class: "cars", "data-testid": "recommendations" },
    recs.cars.map((r) =>
      h(
        "div",
        { class: "car", "data-testid": "car" },
        h("strong", {}, `${r.car?.brand} ${r.car?.series} ${r.car?.modelYear}`),
        h("div", {}, `${yuan(r.car?.priceYuan ?? 0n)} · ${km(r.car?.mileageKm ?? 0n)} · ${r.car?.city}`),
        h("div", { class: "muted" }, `#${r.car?.id} · score ${r.score.toFixed(2)}`),
        h("ul", {}, r.reasons.slice(0, 3).map((x) => h("li", {}, x.text))),
      ),
    ),
  );
}

/** When the agent got the task (its latest offer of it, by the service's clock); 0 when
 * the history does not say. */
function heldSince(history: TaskEvent[], agentId: bigint): number {
  let at = 0;
  for (const e of history) if (e.kind === "OFFERED" && e.agentId === agentId) at = Math.max(at, ms(e.at));
  return at;
}

/** A recorded call's start: `duration` seconds before now (the call just ended), but
 * never before the agent got the task (the service refuses such a start). */
function callStart(nowMs: number, durationS: number, heldSinceMs: number): number {
  return Math.max(nowMs - durationS * 1000, heldSinceMs);
}

/** What the agent can do with the task now. */
function actions(task: Task, session: Session, history: TaskEvent[], done: () => void): HTMLElement | null {
  if (task.agentId !== session.agentId) return null;
  const error = h("p", { class: "error", "data-testid": "action-error" });
  const run = async (f: () => Promise<unknown>) => {
    error.textContent = "";
    try {
      await f();
      done();
    } catch (err) {
      error.textContent = describeError(err);
    }
  };
  const who = { taskId: task.id, agentId: session.agentId };
  if (task.status === Status.ASSIGNED) {
    return h(
      "div",
      { class: "card actions" },
      h("button", { "data-testid": "detail-accept", onclick: () => void run(() => assignment.acceptTask(who)) }, "Accept"),
      h(
        "button",
        { class: "secondary", onclick: () => void run(() => assignment.rejectTask({ ...who, reason: "rejected at the console" })) },
        "Reject",
      ),
      error,
    );
  }
  if (task.status !== Status.IN_PROGRESS) return null;
  const outcome = select(
    "call-outcome",
    enumOptions(CallOutcome as never, (v) => enumName(CallOutcome, v)),
    String(CallOutcome.CONNECTED),
    () => {},
  );
  const provider = select(
    "call-provider",
    enumOptions(TelephonyProvider as never, (v) => enumName(TelephonyProvider, v)),
    String(TelephonyProvider.ZT),
    () => {},
  );
  const duration = h("input", { type: "number", min: 0, value: 60, "data-testid": "call-duration" });
  const callNote = h("input", { "data-testid": "call-note", placeholder: "call note (no phone numbers)" });
  const recordCall = () =>
    assignment.recordCall({
      ...who,
      callId: `web-${crypto.randomUUID()}`,
      callType: CallType.CALLOUT,
      provider: Number(provider.value),
      outcome: Number(outcome.value),
      durationSeconds: Number(duration.value || 0),
      startedAt: timestampFromMs(
        callStart(Date.now(), Number(duration.value || 0), heldSince(history, session.agentId)),
      ),
      note: callNote.value,
    });
  const note = h("input", { "data-testid": "complete-note", placeholder: "outcome note" });
  const revisit = h("input", { type: "number", min: 0, "data-testid": "complete-revisit", placeholder: "minutes" });
  const reason = h("input", { "data-testid": "fail-reason", placeholder: "why it failed" });
  return h(
    "div",
    { class: "card actions" },
    h("h3", {}, "Handle the task"),
    h(
      "div",
      { class: "row" },
      "Call: ",
      outcome,
      provider,
      duration,
      " s ",
      callNote,
      h("button", { class: "secondary", "data-testid": "record-call", onclick: () => void run(recordCall) }, "Record call"),
    ),
    h(
      "div",
      { class: "row" },
      note,
      h("label", {}, "call back in ", revisit, " min"),
      h(
        "button",
        {
          "data-testid": "complete-task",
          onclick: () =>
            void run(() =>
              assignment.completeTask({
                ...who,
                note: note.value,
                revisitAt: revisit.value && Number(revisit.value) > 0
                  ? timestampFromMs(Date.now() + Number(revisit.value) * 60_000)
                  : undefined,
              }),
            ),
        },
        "Complete",
      ),
    ),
    h(
      "div",
      { class: "row" },
      reason,
      h(
        "button",
        { class: "danger", "data-testid": "fail-task", onclick: () => void run(() => assignment.failTask({ ...who, reason: reason.value })) },
        "Fail",
      ),
    ),
    error,
  );
}

export { loadSession, saveSession };
