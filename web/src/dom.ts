// A few DOM helpers: the console is small enough not to need a framework.

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | EventListener | undefined>;

/** Creates an element: h("button", {onclick: f, "data-testid": "x"}, "Accept"). */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    if (typeof value === "function") {
      el.addEventListener(key.replace(/^on/, ""), value);
    } else if (key === "value" && "value" in el) {
      (el as HTMLInputElement).value = String(value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el: Element, children: (Child | Child[])[]): void {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces the content of ``el``. */
export function mount(el: Element, ...children: (Child | Child[])[]): void {
  el.replaceChildren();
  append(el, children);
}

/** A <select> over [value, label] pairs. */
export function select(
  testid: string,
  options: [string, string][],
  value: string,
  onchange: (value: string) => void,
): HTMLSelectElement {
  const el = h("select", { "data-testid": testid });
  for (const [v, label] of options) {
    el.append(h("option", { value: v, selected: v === value }, label));
  }
  el.addEventListener("change", () => onchange(el.value));
  return el;
}
