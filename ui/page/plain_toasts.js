// Gradio renders a toast's message as HTML, so a "<lora:name:w>" tag in an error vanished with everything
// after it. The page's copy of each error and warning message is made plain text (&, < and > escaped)
// as it arrives on the queue's event stream; the server's messages, which API clients read, stay raw.
(() => {
  const escape = (text) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const plainLine = (line) => {
    if (!line.startsWith("data:")) return line;
    let message;
    try {
      message = JSON.parse(line.slice(5));
    } catch (error) {
      return line;
    }
    if (message.msg === "process_completed" && typeof message.output?.error === "string") {
      message.output.error = escape(message.output.error);
    } else if (message.msg === "log" && typeof message.log === "string") {
      message.log = escape(message.log);
    } else {
      return line;
    }
    return "data: " + JSON.stringify(message);
  };
  const fetchRaw = window.fetch.bind(window);
  window.fetch = async (input, init) => {
    const response = await fetchRaw(input, init);
    const url = input instanceof Request ? input.url : String(input);
    if (!url.includes("/queue/data") || !response.body) return response;
    let rest = "";
    const lines = new TransformStream({
      transform(chunk, controller) {
        const parts = (rest + chunk).split("\n");
        rest = parts.pop();
        controller.enqueue(parts.map(plainLine).join("\n") + "\n");
      },
      flush(controller) {
        if (rest) controller.enqueue(plainLine(rest));
      },
    });
    const body = response.body.pipeThrough(new TextDecoderStream()).pipeThrough(lines)
      .pipeThrough(new TextEncoderStream());
    return new Response(body, {status: response.status, statusText: response.statusText, headers: response.headers});
  };
})();
