// Resolver: the tag map of a cloud resource, merged from the component's
// properties. Tags set on the component win over the defaults; the name and the
// environment always become tags. Returns an object (response type "object").
// Run: veritech run examples/tags.js --response-type object --args @examples/args/tags.json
function main(component) {
  const { name, environment, owner, tags } = component ?? {};
  const merged = {
    ManagedBy: "veritech",
    ...(owner ? { Owner: owner } : {}),
    ...(tags ?? {}),
  };
  if (name) merged.Name = name;
  if (environment) merged.Environment = environment;
  const keys = Object.keys(merged).sort();
  console.log(`${keys.length} tags: ${keys.join(", ")}`);
  return Object.fromEntries(keys.map((key) => [key, String(merged[key])]));
}
