// The console's shell: a header, hash routes, and the agent's side panel (presence and
// live offers) kept open across the agent's pages.
//   #/signin        sign in as an agent
//   #/console       the agent's tasks (filters, paging)
//   #/tasks/<id>    one task: customer (masked), history, call records, recommended cars
//   #/config        config review (per service and business line)
import "./style.css";
import { assignment, loadSession, saveSession } from "./api";
import { configPage } from "./config";
import { AgentPanel, navigate, reloadTaskList, signInPage, taskDetailPage, taskListPage } from "./console";
import { h, mount } from "./dom";
import { Presence } from "./gen/crm/assignment/v1/assignment_pb";

const app = document.getElementById("app")!;
const header = h("header", {});
const body = h("main", {});
const content = h("div", { class: "content" });
app.append(header, body);

let panel: AgentPanel | null = null;

function renderHeader(): void {
  const s = loadSession();
  mount(
    header,
    h("span", { class: "brand" }, "CRM 2.0"),
    h(
      "nav",
      {},
      h("a", { href: "#/console" }, "Agent console"),
      h("a", { href: "#/config", "data-testid": "nav-config" }, "Config review"),
    ),
    h("span", { class: "spacer" }),
    s
      ? h(
          "span",
          { class: "who", "data-testid": "signed-in" },
          `${s.name} (#${s.agentId}) `,
          h("button", { class: "secondary", "data-testid": "signout", onclick: () => void signOut() }, "Sign out"),
        )
      : null,
  );
}

/** Signing out goes OFFLINE first (best effort), so no offer waits for a closed console. */
async function signOut(): Promise<void> {
  const s = loadSession();
  panel?.stop();
  panel = null;
  if (s) await assignment.setPresence({ agentId: s.agentId, presence: Presence.OFFLINE }).catch(() => {});
  saveSession(null);
  navigate("#/signin");
}

async function route(): Promise<void> {
  const hash = window.location.hash || "#/console";
  renderHeader();
  const config = /^#\/config(?:\/([^/]+)\/([^/]+))?$/.exec(hash);
  if (config) {
    // ops' page: no agent panel (the offer stream stays open in the background)
    mount(body, content);
    await configPage(content, config[1], config[2]);
    return;
  }
  const session = loadSession();
  if (!session || hash === "#/signin") {
    panel?.stop();
    panel = null;
    mount(body, content);
    signInPage(content, () => navigate("#/console"));
    return;
  }
  if (!panel || panel.session.agentId !== session.agentId) {
    panel?.stop();
    panel = new AgentPanel(session, refreshList);
    void panel.start();
  }
  mount(body, panel.el, content);
  const task = /^#\/tasks\/(\d+)$/.exec(hash);
  if (task) {
    await taskDetailPage(content, session, BigInt(task[1]), () => {});
  } else {
    await taskListPage(content, session);
  }
}

/** The task list follows offers and actions (debounced: offers may come in bursts). */
let refreshTimer = 0;
function refreshList(): void {
  window.clearTimeout(refreshTimer);
  refreshTimer = window.setTimeout(() => {
    if ((window.location.hash || "#/console") === "#/console" && !reloadTaskList()) void route();
  }, 300);
}

window.addEventListener("hashchange", () => void route());
void route();
