// Config review: per service and key (for assignment: one per business line), the
// current value with who/when, a validated edit (the service's own parser, as the
// operator's admission webhook), the history with diffs and rollback, and the rollout
// state: which live instance applied which version. Everything goes through the
// ConfigAdminService; its author is the name typed here (`x-crm-author`).
import { createClient } from "@connectrpc/connect";
import { describeError, fieldViolations, transport } from "./api";
import { h, mount } from "./dom";
import { when } from "./format";
import {
  AppliedVersion,
  ChangeKind,
  ConfigAdminService,
  Source,
  type ConfigVersion,
  type GetResponse,
  type RolloutResponse,
} from "./gen/crm/config/v1/config_pb";

const admin = createClient(ConfigAdminService, transport);
const AUTHOR_KEY = "crm.config.author";

function author(): string {
  return localStorage.getItem(AUTHOR_KEY) ?? "";
}

function writeOptions(): { headers: Record<string, string> } {
  return { headers: { "x-crm-author": author() || "console" } };
}

function pretty(json: string): string {
  try {
    return JSON.stringify(JSON.parse(json), null, 2);
  } catch {
    return json;
  }
}

function sourceLabel(v: ConfigVersion): string {
  if (v.source === Source.CRMCONFIG) return `CRMConfig operator (generation ${v.generation})`;
  if (v.source === Source.ADMIN) return v.author || "admin";
  return "unknown (written by hand)";
}

const VERSION_LABEL: Record<number, string> = {
  [AppliedVersion.STABLE]: "stable",
  [AppliedVersion.ROLLOUT]: "rollout candidate",
  [AppliedVersion.DEFAULTS]: "defaults",
  [AppliedVersion.OUTDATED]: "outdated",
  [AppliedVersion.REJECTED]: "rejected",
};

export async function configPage(root: HTMLElement, service?: string, key?: string): Promise<void> {
  const nav = h("div", { class: "card", "data-testid": "config-keys" }, h("p", { class: "muted" }, "Loading…"));
  const main = h("div", { class: "content" });
  const who = h("input", {
    "data-testid": "config-author",
    value: author(),
    placeholder: "your name",
    onchange: (ev: Event) => localStorage.setItem(AUTHOR_KEY, (ev.target as HTMLInputElement).value.trim()),
  });
  mount(
    root,
    h(
      "div",
      { class: "config" },
      h("aside", { class: "panel" }, h("div", { class: "card" }, h("label", {}, "Changes made as ", who)), nav),
      main,
    ),
  );
  try {
    const { services } = await admin.list({});
    mount(
      nav,
      services.flatMap((s) => [
        h("h3", {}, s.service),
        h(
          "ul",
          { class: "keys" },
          s.keys.map((k) =>
            h(
              "li",
              { class: s.service === service && k.key === key ? "active" : "" },
              h(
                "a",
                { href: `#/config/${s.service}/${k.key}`, "data-testid": `config-key-${s.service}-${k.key}` },
                k.key,
              ),
              h(
                "span",
                { class: "muted" },
                k.present ? ` r${k.revision}${k.author ? ` · ${k.author}` : ""}` : " defaults",
                k.rolloutPercent !== undefined ? ` · rollout ${k.rolloutPercent}%` : "",
              ),
            ),
          ),
        ),
      ]),
    );
  } catch (err) {
    mount(nav, h("p", { class: "error" }, describeError(err)));
  }
  if (!service || !key) {
    mount(main, h("div", { class: "card" }, h("p", { class: "muted" }, "Pick a service and key.")));
    return;
  }
  // after a change the key list (revision, author, rollout) is re-read too
  await keyView(main, service, key, () => void configPage(root, service, key));
}

async function keyView(root: HTMLElement, service: string, key: string, reload: () => void): Promise<void> {
  let current: GetResponse;
  let rollout: RolloutResponse;
  let history: ConfigVersion[];
  try {
    [current, rollout, { versions: history }] = await Promise.all([
      admin.get({ service, key }),
      admin.rollout({ service, key }),
      admin.history({ service, key }),
    ]);
  } catch (err) {
    mount(root, h("div", { class: "card" }, h("p", { class: "error", "data-testid": "config-error" }, describeError(err))));
    return;
  }
  const cur = current.current!;
  mount(
    root,
    h(
      "section",
      { class: "card", "data-testid": "config-current", "data-revision": cur.revision.toString() },
      h(
        "h2",
        {},
        `${service} / ${key} `,
        h("button", { class: "secondary", "data-testid": "config-refresh", onclick: reload }, "Refresh"),
      ),
      current.present
        ? h(
            "p",
            {},
            `Revision ${cur.revision} · written by `,
            h("strong", { "data-testid": "config-current-author" }, sourceLabel(cur)),
            ` · ${when(cur.time)}`,
          )
        : h("p", { class: "muted" }, "No value: the service applies its defaults (shown below)."),
      h("pre", { "data-testid": "config-current-value" }, pretty(current.present ? cur.valueJson : current.defaultJson)),
    ),
    editor(service, key, current, reload),
    rolloutView(rollout),
    historyView(service, key, cur.revision, history, reload),
  );
}

function editor(service: string, key: string, current: GetResponse, done: () => void): HTMLElement {
  const cur = current.current!;
  const text = h("textarea", { rows: 12, cols: 70, spellcheck: false, "data-testid": "config-editor" });
  text.value = pretty(current.present ? cur.valueJson : current.defaultJson);
  const percent = h("input", {
    type: "number",
    min: 0,
    max: 100,
    placeholder: "100",
    "data-testid": "config-rollout-percent",
  });
  const errors = h("div", { class: "error", "data-testid": "config-save-error" });
  const ok = h("p", { class: "ok", "data-testid": "config-save-ok" });
  const save = async () => {
    mount(errors);
    ok.textContent = "";
    let value: string;
    try {
      value = JSON.stringify(JSON.parse(text.value));
    } catch (err) {
      errors.textContent = `Not JSON: ${String(err)}`;
      return;
    }
    try {
      const resp = await admin.set(
        {
          service,
          key,
          valueJson: value,
          expectedRevision: cur.revision,
          rolloutPercent: percent.value === "" ? undefined : Number(percent.value),
        },
        writeOptions(),
      );
      ok.textContent = resp.changed ? `Saved as revision ${resp.version?.revision}.` : "No change: the key already holds this.";
      done();
    } catch (err) {
      const fields = fieldViolations(err);
      mount(
        errors,
        h("p", {}, describeError(err).split(" (")[0]),
        fields.length
          ? h("ul", {}, fields.map((f) => h("li", { "data-testid": "config-field-error" }, h("code", {}, f.field), ` ${f.description}`)))
          : null,
      );
    }
  };
  return h(
    "section",
    { class: "card" },
    h("h3", {}, "Change"),
    text,
    h(
      "div",
      { class: "row" },
      h("label", {}, "Roll out to ", percent, " % of the instances (empty: all, as the stable value) "),
      h("button", { "data-testid": "config-save", onclick: () => void save() }, "Validate and save"),
    ),
    h("p", { class: "muted" }, "Checked by the service's own parser, as the operator's admission webhook does; a refused field is named."),
    errors,
    ok,
  );
}

function rolloutView(r: RolloutResponse): HTMLElement {
  return h(
    "section",
    { class: "card", "data-testid": "config-rollout" },
    h("h3", {}, "Rollout"),
    h(
      "p",
      {},
      `Stable revision ${r.stable?.revision ?? 0n}`,
      r.candidate
        ? ` · candidate revision ${r.candidate.revision} rolling out to ${r.candidate.percent}%`
        : " · no rollout running",
      ` · ${r.onStable} on stable, ${r.onCandidate} on the candidate, ${r.lagging} lagging`,
    ),
    r.candidate ? h("pre", {}, pretty(r.candidate.valueJson)) : null,
    h(
      "table",
      { "data-testid": "config-instances" },
      h("thead", {}, h("tr", {}, ["Instance", "Applied revision", "Version", "Bucket", "Acknowledged"].map((c) => h("th", {}, c)))),
      h(
        "tbody",
        {},
        r.instances.length
          ? r.instances.map((i) =>
              h(
                "tr",
                { "data-testid": "config-instance" },
                h("td", {}, i.instance),
                h("td", {}, i.appliedRevision ? String(i.appliedRevision) : "-"),
                h(
                  "td",
                  { class: i.version === AppliedVersion.REJECTED ? "error" : "" },
                  VERSION_LABEL[i.version] ?? "?",
                  i.rejectedRevision ? ` (rejected r${i.rejectedRevision})` : "",
                ),
                h("td", {}, String(i.bucket)),
                h("td", {}, when(i.ackTime)),
              ),
            )
          : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No live instance has acknowledged.")),
      ),
    ),
  );
}

const KIND: Record<number, [string, string]> = {
  [ChangeKind.ADDED]: ["+", "diff-added"],
  [ChangeKind.REMOVED]: ["−", "diff-removed"],
  [ChangeKind.CHANGED]: ["~", "diff-changed"],
};

function historyView(
  service: string,
  key: string,
  currentRevision: bigint,
  versions: ConfigVersion[],
  done: () => void,
): HTMLElement {
  const error = h("p", { class: "error", "data-testid": "config-rollback-error" });
  const rollback = async (revision: bigint) => {
    error.textContent = "";
    try {
      await admin.rollback({ service, key, revision, expectedRevision: currentRevision }, writeOptions());
      done();
    } catch (err) {
      error.textContent = describeError(err);
    }
  };
  return h(
    "section",
    { class: "card", "data-testid": "config-history" },
    h("h3", {}, "History"),
    error,
    versions.length
      ? versions.map((v) =>
          h(
            "div",
            { class: "version", "data-testid": "config-version", "data-revision": v.revision.toString() },
            h(
              "div",
              { class: "row" },
              h("strong", {}, `r${v.revision}`),
              h("span", { "data-testid": "config-version-author" }, sourceLabel(v)),
              h("span", { class: "muted" }, when(v.time)),
              v.revision === currentRevision
                ? h("span", { class: "badge s4" }, "current")
                : h(
                    "button",
                    { class: "secondary", "data-testid": "config-rollback", onclick: () => void rollback(v.revision) },
                    "Roll back to this",
                  ),
            ),
            v.hasPrevious
              ? h(
                  "ul",
                  { class: "diff" },
                  v.changes.map((c) => {
                    const [sign, cls] = KIND[c.kind] ?? ["?", ""];
                    return h(
                      "li",
                      { class: cls, "data-testid": "config-change" },
                      `${sign} `,
                      h("code", {}, c.path),
                      c.kind === ChangeKind.ADDED ? ` = ${c.newJson}` : "",
                      c.kind === ChangeKind.REMOVED ? ` (was ${c.oldJson})` : "",
                      c.kind === ChangeKind.CHANGED ? `: ${c.oldJson} → ${c.newJson}` : "",
                    );
                  }),
                )
              : h("p", { class: "muted" }, "First kept version."),
          ),
        )
      : h("p", { class: "muted" }, "No kept history."),
  );
}
