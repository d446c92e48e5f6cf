// Shared by the dashboard pages: fetch JSON (to the login page on 401), fill tables.
async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { location.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search); throw new Error("401"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
function cell(text, cls) { return { text: String(text), cls }; }
function num(v) { return { text: v == null ? "-" : (typeof v === "number" ? v.toLocaleString("en") : String(v)), cls: "num" }; }
function fill(id, rows, rowClasses) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows.map((r, i) => {
    const tr = document.createElement("tr");
    if (rowClasses && rowClasses[i]) tr.className = rowClasses[i];
    for (const c of r) {
      const td = document.createElement("td");
      if (c && typeof c === "object") { td.textContent = c.text; if (c.cls) td.className = c.cls; } else td.textContent = c ?? "";
      tr.appendChild(td);
    }
    return tr;
  }));
}
function poll(url, render, everyMs) {
  const tick = async () => {
    try { render(await getJSON(url)); } catch (e) { const f = document.getElementById("fresh"); if (f) f.textContent = "error: " + e.message; }
    setTimeout(tick, everyMs);
  };
  tick();
}
