// When another base model is picked, fill in the settings its catalogue entry suggests,
// leaving alone any field the user has already edited.
(function () {
  const form = document.querySelector(".job-form");
  const suggestions = JSON.parse(document.getElementById("model-suggestions").textContent);
  const edited = new Set();
  form.addEventListener("input", (event) => edited.add(event.target.name));
  form.elements["base_model"].addEventListener("change", (event) => {
    for (const [name, value] of Object.entries(suggestions[event.target.value] || {})) {
      const field = form.elements[name];
      if (field && !edited.has(name)) field.value = value;
    }
  });
})();
