#include "agent/daemon/state_file.h"

#include "agent/spec/json.h"
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace vmfence {


static std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out + "\"";
}

Status write_state_file(const std::string& dir, const std::string& config_dir, const std::vector<StateVm>& vms) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  std::string tmp = dir + "/.vms.json.tmp", path = dir + "/vms.json";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << "{\"config\": " << json_string(config_dir) << ", \"pid\": " << getpid() << ", \"vms\": [";
    for (size_t i = 0; i < vms.size(); ++i) {
      const auto& v = vms[i];
      f << (i ? ",\n  " : "\n  ") << "{\"name\": " << json_string(v.name) << ", \"interface\": "
        << json_string(v.interface) << ", \"group\": " << json_string(v.group) << ", \"mode\": "
        << json_string(v.mode) << ", \"vm_id\": " << v.vm_id << ", \"slot\": " << v.slot
        << ", \"policy_id\": " << v.policy_id << ", \"ifindex\": " << v.ifindex << "}";
    }
    f << "\n]}\n";
    if (!f) return Status::error(EIO, "write " + tmp);
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) return Status::error(errno, "rename " + path);
  return {};
}

std::vector<StateVm> read_state_file(const std::string& dir, std::string* config_dir) {
  std::ifstream f(dir + "/vms.json");
  std::stringstream ss;
  ss << f.rdbuf();
  rj::Document d;
  std::vector<StateVm> out;
  if (d.Parse(ss.str().c_str()).HasParseError() || !d.IsObject() || !d.HasMember("vms") || !d["vms"].IsArray())
    return out;
  if (config_dir && d.HasMember("config") && d["config"].IsString()) *config_dir = d["config"].GetString();
  for (const auto& v : d["vms"].GetArray()) {
    StateVm s;
    auto str = [&](const char* k) { return v.HasMember(k) && v[k].IsString() ? v[k].GetString() : ""; };
    auto num = [&](const char* k) { return v.HasMember(k) && v[k].IsUint() ? v[k].GetUint() : 0u; };
    s.name = str("name");
    s.interface = str("interface");
    s.group = str("group");
    s.mode = str("mode");
    s.vm_id = num("vm_id");
    s.slot = num("slot");
    s.policy_id = num("policy_id");
    s.ifindex = num("ifindex");
    out.push_back(s);
  }
  return out;
}

}  // namespace vmfence
