// Validation: is the value an IPv4 CIDR block (a.b.c.d/n) with no host bits set?
// Run: veritech run examples/validation_cidr.js --kind validation --args '"10.0.0.0/16"'
function main(value) {
  if (typeof value !== "string") {
    return { valid: false, message: `expected a string, got ${typeof value}` };
  }
  const match = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(value);
  if (!match) {
    return { valid: false, message: `${value} is not of the form a.b.c.d/n` };
  }
  const octets = match.slice(1, 5).map(Number);
  const bits = Number(match[5]);
  if (octets.some((octet) => octet > 255)) {
    return { valid: false, message: `${value} has an octet above 255` };
  }
  if (bits > 32) {
    return { valid: false, message: `${value} has a prefix length above 32` };
  }
  const address = octets.reduce((acc, octet) => acc * 256 + octet, 0);
  const hostBits = 2 ** (32 - bits);
  if (address % hostBits !== 0) {
    return { valid: false, message: `${value} has host bits set below /${bits}` };
  }
  return { valid: true };
}
