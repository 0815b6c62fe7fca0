// The new-job form: show the settings of the chosen method only, and when another base
// model is picked, fill in the settings its catalogue entry suggests (unless edited).
(function () {
  const form = document.querySelector(".job-form");
  const suggestions = JSON.parse(document.getElementById("model-suggestions").textContent);
  const edited = new Set();
  form.addEventListener("input", (event) => edited.add(event.target.name));

  function showMethodSettings() {
    const method = form.elements["method"].value;
    for (const group of form.querySelectorAll(".method-group")) {
      group.hidden = !group.dataset.methods.split(" ").includes(method);
    }
  }
  form.elements["method"].addEventListener("change", showMethodSettings);
  showMethodSettings();

  form.elements["base_model"].addEventListener("change", (event) => {
    for (const [name, value] of Object.entries(suggestions[event.target.value] || {})) {
      const field = form.elements[name];
      if (field && !edited.has(name)) field.value = value;
    }
  });
})();
