// Resolver that logs on every level, to show how output is reported:
// console.debug -> stdout/debug, console.log and console.info -> stdout/info,
// console.warn -> stderr/warn, console.error -> stderr/error. Objects are
// rendered as JSON; a multi-line message becomes one output line per line.
// Run: veritech run examples/logging_levels.js --args '{"name":"db"}'
function main(input) {
  console.debug("debug: starting");
  console.log("info via log:", input);
  console.info("info via info");
  console.warn("warn: disk 91% full");
  console.error("error: replica unreachable");
  console.log("line one\nline two");
  return `logged for ${input?.name ?? "nobody"}`;
}
