output "controller_url" {
  description = "Where notebooks connect: nanogrid.connect(this, api_key=...)"
  value       = module.controller.url
}

output "settings" {
  description = "The grid's settings, as the instances get them (nanogrid aws bootstrap prints the same names)"
  value       = local.settings
}
