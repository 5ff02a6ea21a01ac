// Action: restart a service. The function would call the cloud API here (it has
// no network inside the sandbox, so this example decides from its arguments):
// a stopped service is an error, a degraded one restarts with a warning. A
// thrown error would also be reported as status "error".
// Run: veritech run examples/action_restart.js --kind action --args @examples/args/restart.json
async function main({ service, state, resource_id: resourceId } = {}) {
  if (!service) throw new Error("no service given");
  console.log(`restarting ${service} (state: ${state ?? "unknown"})`);
  if (state === "stopped") {
    return {
      status: "error",
      message: `${service} is stopped; start it instead of restarting it`,
    };
  }
  const payload = { service, previous_state: state ?? "unknown" };
  if (state === "degraded") {
    console.warn(`${service} was degraded before the restart`);
    return {
      status: "warning",
      payload,
      message: `${service} restarted; it was degraded`,
      resource_id: resourceId,
    };
  }
  return { status: "ok", payload, message: `${service} restarted`, resource_id: resourceId };
}
