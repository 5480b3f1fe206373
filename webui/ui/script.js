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

// img2img's editors (Sketch, Inpaint, Inpaint sketch) decode an upload in the browser, so a file that is not
// an image never reaches the server and the editor just stays empty. Note its name in a hidden box, so that
// Generate answers in one sentence that the file is not an image (webui/ui/img2img_modes.py).
const SDUI_EDITORS = ["img2img_sketch", "img2maskimg", "inpaint_sketch"];

function sduiNoteUnreadable(editorId, name) {
  const box = document.querySelector("#img2img_unreadable_uploads textarea, #img2img_unreadable_uploads input");
  if (!box) return;
  let state = {};
  try { state = JSON.parse(box.value || "{}"); } catch (error) { state = {}; }
  if (name) state[editorId] = name; else delete state[editorId];
  box.value = JSON.stringify(state);
  box.dispatchEvent(new Event("input", { bubbles: true }));
}

function sduiCheckEditorFile(target, files) {
  const editor = target && target.closest ? SDUI_EDITORS.find((id) => target.closest("#" + id)) : undefined;
  if (!editor || !files || !files.length) return;
  const file = files[0];
  createImageBitmap(file).then((bitmap) => { bitmap.close(); sduiNoteUnreadable(editor, null); },
                               () => sduiNoteUnreadable(editor, file.name));
}

document.addEventListener("change", (event) => {
  if (event.target && event.target.type === "file") sduiCheckEditorFile(event.target, event.target.files);
}, true);
document.addEventListener("drop", (event) => {
  sduiCheckEditorFile(event.target, event.dataTransfer && event.dataTransfer.files);
}, true);
