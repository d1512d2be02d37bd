#include "agent/daemon/state_file.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "agent/spec/json.h"

namespace vmfence {

Status write_state_file(const std::string& dir, const State& state) {
  rj::StringBuffer buf;
  rj::PrettyWriter<rj::StringBuffer> w(buf);
  w.StartObject();
  w.Key("config");
  w.String(state.config_dir.c_str());
  w.Key("pid");
  w.Int(state.pid ? state.pid : getpid());
  w.Key("scanned_ns");
  w.Int64(state.scanned_ns);
  w.Key("vms");
  w.StartArray();
  for (const auto& v : state.vms) {
    w.StartObject();
    w.Key("name");
    w.String(v.name.c_str());
    w.Key("interface");
    w.String(v.interface.c_str());
    w.Key("group");
    w.String(v.group.c_str());
    w.Key("mode");
    w.String(v.mode.c_str());
    w.Key("vm_id");
    w.Uint(v.vm_id);
    w.Key("slot");
    w.Uint(v.slot);
    w.Key("policy_id");
    w.Uint(v.policy_id);
    w.Key("ifindex");
    w.Uint(v.ifindex);
    w.Key("enforced");
    w.Bool(v.enforced);
    w.EndObject();
  }
  w.EndArray();
  w.Key("rejected");
  w.StartArray();
  for (const auto& r : state.rejected) {
    w.StartObject();
    w.Key("file");
    w.String(r.file.c_str());
    w.Key("name");
    w.String(r.name.c_str());
    w.Key("interface");
    w.String(r.interface.c_str());
    w.Key("errors");
    w.StartArray();
    for (const auto& e : r.errors) w.String(e.c_str());
    w.EndArray();
    w.Key("kept_last_good");
    w.Bool(r.kept_last_good);
    w.Key("mtime_ns");
    w.Int64(r.mtime_ns);
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return write_file_atomic(dir + "/vms.json", buf.GetString());
}

Status write_file_atomic(const std::string& path, const std::string& text) {
  std::filesystem::path p(path);
  std::string tmp = (p.parent_path() / ("." + p.filename().string() + ".tmp")).string();
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text << "\n";
    if (!f.flush()) return Status::error(EIO, "write " + tmp);
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) return Status::error(errno, "rename " + path);
  return {};
}

State read_state(const std::string& dir) {
  State out;
  std::ifstream f(dir + "/vms.json");
  std::stringstream ss;
  ss << f.rdbuf();
  rj::Document d;
  if (d.Parse(ss.str().c_str()).HasParseError() || !d.IsObject()) return out;
  auto str = [](const rj::Value& v, const char* k) {
    return v.HasMember(k) && v[k].IsString() ? std::string(v[k].GetString()) : std::string();
  };
  auto num = [](const rj::Value& v, const char* k) { return v.HasMember(k) && v[k].IsUint() ? v[k].GetUint() : 0u; };
  auto flag = [](const rj::Value& v, const char* k) { return v.HasMember(k) && v[k].IsBool() && v[k].GetBool(); };
  out.config_dir = str(d, "config");
  out.pid = d.HasMember("pid") && d["pid"].IsInt() ? d["pid"].GetInt() : 0;
  out.scanned_ns = d.HasMember("scanned_ns") && d["scanned_ns"].IsInt64() ? d["scanned_ns"].GetInt64() : 0;
  if (d.HasMember("vms") && d["vms"].IsArray())
    for (const auto& v : d["vms"].GetArray()) {
      if (!v.IsObject()) continue;
      StateVm s;
      s.name = str(v, "name");
      s.interface = str(v, "interface");
      s.group = str(v, "group");
      s.mode = str(v, "mode");
      s.vm_id = num(v, "vm_id");
      s.slot = num(v, "slot");
      s.policy_id = num(v, "policy_id");
      s.ifindex = num(v, "ifindex");
      s.enforced = flag(v, "enforced");
      out.vms.push_back(s);
    }
  if (d.HasMember("rejected") && d["rejected"].IsArray())
    for (const auto& v : d["rejected"].GetArray()) {
      if (!v.IsObject()) continue;
      StateRejected r;
      r.file = str(v, "file");
      r.name = str(v, "name");
      r.interface = str(v, "interface");
      if (v.HasMember("errors") && v["errors"].IsArray())
        for (const auto& e : v["errors"].GetArray())
          if (e.IsString()) r.errors.push_back(e.GetString());
      r.kept_last_good = flag(v, "kept_last_good");
      r.mtime_ns = v.HasMember("mtime_ns") && v["mtime_ns"].IsInt64() ? v["mtime_ns"].GetInt64() : 0;
      out.rejected.push_back(std::move(r));
    }
  return out;
}

Status write_fleet_status(const std::string& dir, const FleetState& f) {
  rj::StringBuffer buf;
  rj::Writer<rj::StringBuffer> w(buf);
  w.StartObject();
  w.Key("host");
  w.String(f.host.c_str());
  w.Key("connected");
  w.Bool(f.connected);
  w.Key("synced");
  w.Bool(f.synced);
  w.Key("confirmed_ns");
  w.Int64(f.confirmed_ns);
  w.Key("remote_vms");
  w.Uint64(f.remote_vms);
  w.Key("conflicts");
  w.Uint64(f.conflicts);
  w.Key("error");
  w.String(f.error.c_str());
  w.EndObject();
  return write_file_atomic(dir + "/fleet.json", buf.GetString());
}

std::optional<FleetState> read_fleet_status(const std::string& dir) {
  std::ifstream in(dir + "/fleet.json");
  if (!in) return std::nullopt;
  std::stringstream ss;
  ss << in.rdbuf();
  rj::Document d;
  if (d.Parse(ss.str().c_str()).HasParseError() || !d.IsObject()) return std::nullopt;
  FleetState f;
  if (d.HasMember("host") && d["host"].IsString()) f.host = d["host"].GetString();
  if (d.HasMember("error") && d["error"].IsString()) f.error = d["error"].GetString();
  f.connected = d.HasMember("connected") && d["connected"].IsBool() && d["connected"].GetBool();
  f.synced = d.HasMember("synced") && d["synced"].IsBool() && d["synced"].GetBool();
  if (d.HasMember("confirmed_ns") && d["confirmed_ns"].IsInt64()) f.confirmed_ns = d["confirmed_ns"].GetInt64();
  if (d.HasMember("remote_vms") && d["remote_vms"].IsUint64()) f.remote_vms = d["remote_vms"].GetUint64();
  if (d.HasMember("conflicts") && d["conflicts"].IsUint64()) f.conflicts = d["conflicts"].GetUint64();
  return f;
}

std::vector<StateVm> read_state_file(const std::string& dir, std::string* config_dir) {
  State s = read_state(dir);
  if (config_dir) *config_dir = s.config_dir;
  return s.vms;
}

}  // namespace vmfence
