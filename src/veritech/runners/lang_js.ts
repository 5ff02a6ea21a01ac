// lang-js: the JavaScript/TypeScript runner, a Deno program started by cyclone.
//
// Contract with cyclone (docs/protocol.md, section 3):
//   1. On start it writes {"type":"ready"} as one line on stdout.
//   2. It reads one line on stdin: {nonce, kind, handler, code, language, args,
//      secrets}.
//   3. It writes one JSON object per line on stdout, each carrying the nonce:
//      {"nonce", "type":"output", stream, level, message, timestamp}*, then one of
//      {"nonce", "type":"return", value} or {"nonce", "type":"throw", name, message}
//      and exits.
//
// User code shares this isolate, so everything the runner needs after user code
// is loaded is captured first (primordials), and the nonce never passes through a
// function that user code could replace. A line without the nonce is, to cyclone,
// just text that user code printed: it cannot forge a protocol message.

const write = Deno.stdout.writeSync.bind(Deno.stdout);
const encoder = new TextEncoder();
const encode = encoder.encode.bind(encoder);
const decoder = new TextDecoder();
const stringify = JSON.stringify;
const parse = JSON.parse;
const exit = Deno.exit;
const dateNow = Date.now;
const toISO = Date.prototype.toISOString;
const DateCtor = Date;
const StringCtor = String;
const objectCreate = Object.create;
const fromCharCode = String.fromCharCode;
const base64 = btoa;
const addListener = globalThis.addEventListener.bind(globalThis);

let nonce = "";
let settled = false;

function writeAll(bytes: Uint8Array): void {
  let offset = 0;
  while (offset < bytes.length) {
    offset += write(bytes.subarray(offset));
  }
}

// Build a protocol line as text so that no user-reachable toJSON or getter ever
// sees an object holding the nonce.
function emit(type: string, body: Record<string, unknown>): void {
  const rest = stringify(body);
  const head = '{"nonce":' + stringify(nonce) + ',"type":' + stringify(type);
  const line = rest === "{}" ? head + "}\n" : head + "," + rest.slice(1) + "\n";
  writeAll(encode(line));
}

function render(value: unknown): string {
  if (typeof value === "string") return value;
  if (value instanceof Error) return StringCtor(value.stack ?? value);
  if (value === undefined) return "undefined";
  try {
    const text = stringify(value);
    return text === undefined ? StringCtor(value) : text;
  } catch {
    return StringCtor(value);
  }
}

function output(stream: string, level: string, args: unknown[]): void {
  const text = args.map(render).join(" ");
  const timestamp = toISO.call(new DateCtor(dateNow()));
  for (const message of text.split("\n")) {
    const body = objectCreate(null);
    body.stream = stream;
    body.level = level;
    body.message = message;
    body.timestamp = timestamp;
    emit("output", body);
  }
}

function finish(type: "return" | "throw", body: Record<string, unknown>): never {
  if (!settled) {
    settled = true;
    try {
      emit(type, body);
    } catch (error) {
      // The value could be serialized once but not written (a stack
      // overflow on a very deep value): report that rather than nothing.
      const failure = objectCreate(null);
      failure.name = "UnserializableReturn";
      failure.message = "the returned value cannot be written: " +
        errorMessage(error);
      emit("throw", failure);
    }
  }
  exit(0);
}

function errorName(error: unknown): string {
  if (error instanceof Error) return error.name || "Error";
  return "Error";
}

function errorMessage(error: unknown): string {
  if (error instanceof Error) return StringCtor(error.message);
  return render(error);
}

// Module load errors name the code by its (long, base64) data URL; say "code".
const DATA_URL = /data:application\/(?:java|type)script;base64,[A-Za-z0-9+/=]+/g;

const ALLOW_FLAG_ADVICE = /, run again with the --allow-[a-z-]+ flag/g;

function fail(error: unknown): never {
  const body = objectCreate(null);
  let name = errorName(error);
  let message = errorMessage(error).replace(DATA_URL, "<code>");
  // Deno reports a parse failure of a dynamically imported module as a
  // TypeError whose message starts with the real class.
  if (message.startsWith("SyntaxError: ")) {
    name = "SyntaxError";
    message = message.slice("SyntaxError: ".length);
  }
  // Deno's advice to "run again with the --allow-net flag" is for whoever
  // starts Deno; the function's author cannot, and must not, follow it.
  message = message.replace(ALLOW_FLAG_ADVICE, "");
  body.name = name;
  body.message = message;
  finish("throw", body);
}

function succeed(value: unknown): never {
  let text: string | undefined;
  // JSON.stringify turns these into nothing at all; saying so beats a
  // silent null.
  if (typeof value === "function" || typeof value === "symbol") {
    const body = objectCreate(null);
    body.name = "UnserializableReturn";
    body.message = "the returned value cannot be represented as JSON: it is a " +
      typeof value;
    finish("throw", body);
  }
  try {
    text = stringify(value === undefined ? null : value);
  } catch (error) {
    const body = objectCreate(null);
    body.name = "UnserializableReturn";
    body.message = "the returned value cannot be represented as JSON: " +
      errorMessage(error);
    finish("throw", body);
  }
  const body = objectCreate(null);
  body.value = parse(text ?? "null");
  finish("return", body);
}

function toBase64(bytes: Uint8Array): string {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += fromCharCode(...bytes.subarray(i, i + chunk));
  }
  return base64(binary);
}

async function readRequestLine(): Promise<string> {
  const reader = Deno.stdin.readable.getReader();
  let buffered = "";
  while (true) {
    const { value, done } = await reader.read();
    if (value) buffered += decoder.decode(value, { stream: true });
    const newline = buffered.indexOf("\n");
    if (newline >= 0) {
      reader.releaseLock();
      return buffered.slice(0, newline);
    }
    if (done) {
      reader.releaseLock();
      return buffered;
    }
  }
}

function installConsole(): void {
  const capture = (stream: string, level: string) => (...args: unknown[]) =>
    output(stream, level, args);
  console.log = capture("stdout", "info");
  console.info = capture("stdout", "info");
  console.debug = capture("stdout", "debug");
  console.trace = capture("stdout", "debug");
  console.warn = capture("stderr", "warn");
  console.error = capture("stderr", "error");
}

// Errors that escape the handler's promise chain before it settles are the
// function's failure; after it settles the process is already exiting.
function installFailureHooks(): void {
  addListener("unhandledrejection", (event: PromiseRejectionEvent) => {
    event.preventDefault();
    fail(event.reason);
  });
  addListener("error", (event: ErrorEvent) => {
    event.preventDefault();
    fail(event.error ?? event.message);
  });
  // The event loop ran dry while the handler's promise was still pending:
  // nothing can ever settle it, so say so now instead of waiting for a timeout.
  addListener("beforeunload", () => {
    if (!settled) {
      const body = objectCreate(null);
      body.name = "UnsettledPromise";
      body.message =
        "the handler's promise never settled and nothing is left to wait for";
      finish("throw", body);
    }
  });
}

async function main(): Promise<void> {
  writeAll(encode('{"type":"ready"}\n'));
  const request = parse(await readRequestLine());
  nonce = StringCtor(request.nonce);
  installConsole();
  installFailureHooks();

  const mediaType = request.language === "typescript"
    ? "application/typescript"
    : "application/javascript";
  // Exporting the handler under a private alias accepts both `export function
  // main` and a plain top-level `function main`. The export goes first, on the
  // code's own first line, so that an unclosed bracket in the code cannot
  // swallow it and error positions keep the code's line numbers.
  const source = "export { " + request.handler + " as __veritech_entry__ }; " +
    request.code + "\n";
  let entry: unknown;
  try {
    const module = await import(
      "data:" + mediaType + ";base64," + toBase64(encode(source))
    );
    entry = module.__veritech_entry__;
  } catch (error) {
    const message = errorMessage(error);
    if (message.startsWith("Export '" + request.handler + "' is not defined")) {
      const body = objectCreate(null);
      body.name = "HandlerNotFound";
      body.message = "handler '" + request.handler +
        "' is not defined at the top level of the code";
      finish("throw", body);
    }
    if (message.includes("SyntaxError")) {
      // The message quotes the first line with the export in front of it and
      // counts columns from there: parse the code alone for the user's view.
      try {
        await import(
          "data:" + mediaType + ";base64," + toBase64(encode(request.code))
        );
      } catch (plain) {
        fail(plain);
      }
    }
    fail(error);
  }
  if (typeof entry !== "function") {
    const body = objectCreate(null);
    body.name = "HandlerNotFound";
    body.message = "handler '" + request.handler + "' is not a function";
    finish("throw", body);
  }
  try {
    const value = await (entry as (a: unknown, s: unknown) => unknown)(
      request.args ?? null,
      request.secrets ?? {},
    );
    succeed(value);
  } catch (error) {
    fail(error);
  }
}

main().catch(fail);
