// Qualification: check a security group's ingress rules and explain every
// problem. A port open to the whole internet fails the qualification unless it
// is on the allowed list; a rule with an invalid port range is a failure too;
// no rule at all is only a warning.
// Run: veritech run examples/qualification_ports.js --kind qualification --args @examples/args/ports_bad.json
const PUBLIC = ["0.0.0.0/0", "::/0"];

function problemsOf(rule, allowed) {
  const problems = [];
  const { port, to_port: toPort = port, cidr, protocol = "tcp" } = rule;
  if (!Number.isInteger(port) || port < 0 || port > 65535 || toPort < port) {
    problems.push(`invalid port range ${port}-${toPort}`);
  } else if (PUBLIC.includes(cidr) && !allowed.includes(port)) {
    problems.push(`${protocol} port ${port} is open to the internet (${cidr})`);
  }
  return problems;
}

function main({ ingress = [], allowed_public_ports: allowed = [443] } = {}) {
  if (ingress.length === 0) {
    return { result: "warning", message: "no ingress rules: nothing can reach it" };
  }
  const problems = ingress.flatMap((rule) => problemsOf(rule, allowed));
  for (const problem of problems) console.warn(problem);
  if (problems.length > 0) {
    return { result: "failure", message: problems.join("; ") };
  }
  console.log(`${ingress.length} ingress rules checked`);
  return { result: "success" };
}
