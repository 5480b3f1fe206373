// Ctrl+Enter (Cmd+Enter on macOS) presses Generate of the tab on screen, as in A1111.
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
  for (const tab of ["txt2img", "img2img"]) {
    const button = document.getElementById(tab + "_generate");
    if (button && button.offsetParent !== null) {
      event.preventDefault();
      button.click();
      return;
    }
  }
});

// The Settings tab's search box: hide the settings whose label (or option name) lacks the text, and the
// headings left with none.
document.addEventListener("input", (event) => {
  const box = event.target;
  if (!box.closest || !box.closest("#settings_search")) return;
  const q = (box.value || "").trim().toLowerCase();
  const root = document.getElementById("settings");
  if (!root) return;
  root.querySelectorAll("[id^='setting_']").forEach((el) => {
    const label = el.querySelector("label, [data-testid='block-info'], .block-info");
    const text = ((label ? label.innerText : el.innerText) + " " + el.id.slice(8).replace(/_/g, " ")).toLowerCase();
    el.classList.toggle("sdui-hidden", q !== "" && !text.includes(q));
  });
  root.querySelectorAll("[id^='settings_section_']").forEach((group) => {
    const shown = [...group.querySelectorAll("[id^='setting_']")].some((el) => !el.classList.contains("sdui-hidden"));
    group.classList.toggle("sdui-hidden", !shown);
  });
});
