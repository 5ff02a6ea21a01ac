// Resolver: build a container image reference from a component's properties.
// Run: veritech run examples/image_reference.js --args '{"registry":"ghcr.io","repository":"acme/api","tag":"1.4.2"}'
function main(component) {
  const { registry, repository, tag, digest } = component ?? {};
  if (!repository) {
    console.warn("no repository set; the image reference is unset");
    return null;
  }
  const host = registry ? `${registry.replace(/\/+$/, "")}/` : "";
  const reference = digest ? `${host}${repository}@${digest}` : `${host}${repository}:${tag ?? "latest"}`;
  console.log(`image reference: ${reference}`);
  return reference;
}
