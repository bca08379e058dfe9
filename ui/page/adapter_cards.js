// One listener for the whole grid (its cards are re-rendered on every search): a click on a card sends
// the card's name, and "preview" when it was the card's "make one" button.
element.addEventListener("click", (event) => {
  const card = event.target.closest(".adapter-card");
  if (!card) return;
  const button = event.target.closest("[data-action]");
  trigger("click", {name: card.dataset.name, action: button ? button.dataset.action : "add"});
});
