-- mipvpn.lua: Wireshark/tshark dissector for the mipvpn binding messages.
--
-- Binding Update / Acknowledge / Request / Warning (route optimisation and smooth handoff,
-- semantics of draft-ietf-mobileip-optim) travel on UDP 434 as RFC 4064 Experimental
-- Messages (Mobile IP type 255) with Vendor-Id 32473 and a subtype (1 BU, 2 BA, 3 BR, 4 BW).
-- See docs/protocol.md, "Mobile IP: route optimisation and smooth handoff messages".
--
-- Load:   tshark -X lua_script:docs/wireshark/mipvpn.lua -r capture.pcap
--         wireshark -X lua_script:docs/wireshark/mipvpn.lua capture.pcap
--         or copy the file into the personal Lua plugins folder
--         (Help > About Wireshark > Folders, e.g. ~/.local/lib/wireshark/plugins/).
--
-- The script takes over UDP port 434 and hands every datagram that is not one of ours
-- (any other type, or type 255 of another vendor) to the built-in "mip" dissector, so
-- Registration Requests/Replies decode exactly as before.
--
-- Display filter fields: mipvpn, mipvpn.msg, mipvpn.subtype, mipvpn.vendor_id, mipvpn.flags
-- (.a .i .m .g), mipvpn.lifetime, mipvpn.status, mipvpn.hoa, mipvpn.coa, mipvpn.target,
-- mipvpn.ident, mipvpn.ident.time, mipvpn.ext.type, mipvpn.ext.len, mipvpn.auth.spi,
-- mipvpn.auth.authenticator, mipvpn.nai, mipvpn.vse.vendor_id, mipvpn.vse.vendor_type,
-- mipvpn.vse.value, mipvpn.vse.previous_fa.

local MIP_PORT = 434
local MSG_EXPERIMENTAL = 255
local VENDOR_ID = 32473

local proto = Proto("mipvpn", "mipvpn binding message (Mobile IPv4 Experimental Message)")

local subtype_names = {
    [1] = "Binding Update",
    [2] = "Binding Acknowledge",
    [3] = "Binding Request",
    [4] = "Binding Warning",
}
local fixed_len = { [1] = 20, [2] = 24, [3] = 20, [4] = 16 }  -- BU: +8 when I is set

local status_names = {
    [0] = "Accepted",
    [128] = "Reason unspecified",
    [129] = "Administratively prohibited",
    [130] = "Insufficient resources",
    [131] = "Authentication failed",
    [133] = "Identification mismatch",
    [134] = "Poorly formed Binding Update",
    [139] = "Requested encapsulation unavailable",
    [160] = "VPN info missing",
    [161] = "VPN info not supported",
    [162] = "Path setup failed",
    [163] = "VPN keys refused",
}

local ext_names = {
    [32] = "Mobile-Home Authentication",
    [33] = "Mobile-Foreign Authentication",
    [34] = "Foreign-Home / Binding Authentication",
    [36] = "Generalized Mobile IP Authentication",
    [38] = "Critical Vendor/Organization Specific",
    [131] = "Mobile Node NAI",
    [132] = "MN-FA Challenge",
    [134] = "Normal Vendor/Organization Specific",
}
local long_ext = { [36] = true, [38] = true }  -- type, subtype/reserved, 16-bit length

local vendor_type_names = {
    [1] = "VPN info",
    [2] = "Previous FA",
    [3] = "Service update request",
}

local f = {
    msg = ProtoField.string("mipvpn.msg", "Message"),
    type = ProtoField.uint8("mipvpn.type", "Type", base.DEC),
    subtype = ProtoField.uint8("mipvpn.subtype", "Subtype", base.DEC, subtype_names),
    reserved = ProtoField.uint16("mipvpn.reserved", "Reserved", base.HEX),
    vendor_id = ProtoField.uint32("mipvpn.vendor_id", "Vendor-Id", base.DEC),
    flags = ProtoField.uint8("mipvpn.flags", "Flags", base.HEX),
    flag_a = ProtoField.bool("mipvpn.flags.a", "Acknowledge requested (A)", 8, nil, 0x80),
    flag_i = ProtoField.bool("mipvpn.flags.i", "Identification present (I)", 8, nil, 0x40),
    flag_m = ProtoField.bool("mipvpn.flags.m", "Minimal encapsulation (M)", 8, nil, 0x20),
    flag_g = ProtoField.bool("mipvpn.flags.g", "GRE encapsulation (G)", 8, nil, 0x10),
    flag_r = ProtoField.uint8("mipvpn.flags.reserved", "Reserved flags", base.HEX, nil, 0x0f),
    reserved8 = ProtoField.uint8("mipvpn.reserved8", "Reserved", base.HEX),
    lifetime = ProtoField.uint16("mipvpn.lifetime", "Lifetime", base.DEC),
    status = ProtoField.uint8("mipvpn.status", "Status", base.DEC, status_names),
    hoa = ProtoField.ipv4("mipvpn.hoa", "Home Address"),
    coa = ProtoField.ipv4("mipvpn.coa", "Care-of Address"),
    target = ProtoField.ipv4("mipvpn.target", "Target Node"),
    ident = ProtoField.uint64("mipvpn.ident", "Identification", base.HEX),
    ident_time = ProtoField.absolute_time("mipvpn.ident.time", "Identification (as NTP time)", base.UTC),
    ext_type = ProtoField.uint8("mipvpn.ext.type", "Extension Type", base.DEC, ext_names),
    ext_subtype = ProtoField.uint8("mipvpn.ext.subtype", "Subtype / Reserved", base.DEC),
    ext_len = ProtoField.uint16("mipvpn.ext.len", "Extension Length", base.DEC),
    ext_data = ProtoField.bytes("mipvpn.ext.data", "Extension Data"),
    spi = ProtoField.uint32("mipvpn.auth.spi", "SPI", base.HEX),
    authenticator = ProtoField.bytes("mipvpn.auth.authenticator", "Authenticator"),
    nai = ProtoField.string("mipvpn.nai", "NAI"),
    challenge = ProtoField.bytes("mipvpn.challenge", "Challenge"),
    vse_reserved = ProtoField.uint16("mipvpn.vse.reserved", "Reserved", base.HEX),
    vse_vendor = ProtoField.uint32("mipvpn.vse.vendor_id", "Vendor-Id", base.DEC),
    vse_type = ProtoField.uint16("mipvpn.vse.vendor_type", "Vendor Type", base.DEC),
    vse_value = ProtoField.bytes("mipvpn.vse.value", "Vendor Value"),
    prev_fa = ProtoField.ipv4("mipvpn.vse.previous_fa", "Previous FA care-of address"),
}
proto.fields = {
    f.msg, f.type, f.subtype, f.reserved, f.vendor_id, f.flags, f.flag_a, f.flag_i, f.flag_m,
    f.flag_g, f.flag_r, f.reserved8, f.lifetime, f.status, f.hoa, f.coa, f.target, f.ident,
    f.ident_time, f.ext_type, f.ext_subtype, f.ext_len, f.ext_data, f.spi, f.authenticator,
    f.nai, f.challenge, f.vse_reserved, f.vse_vendor, f.vse_type, f.vse_value, f.prev_fa,
}

local e_malformed = ProtoExpert.new("mipvpn.malformed", "Malformed binding message",
    expert.group.MALFORMED, expert.severity.ERROR)
local e_reserved = ProtoExpert.new("mipvpn.reserved.nonzero", "Reserved bits not zero",
    expert.group.PROTOCOL, expert.severity.WARN)
local e_subtype = ProtoExpert.new("mipvpn.subtype.unknown", "Unknown binding message subtype",
    expert.group.UNDECODED, expert.severity.WARN)
local e_status = ProtoExpert.new("mipvpn.status.rejected", "Binding Update rejected",
    expert.group.RESPONSE_CODE, expert.severity.NOTE)
proto.experts = { e_malformed, e_reserved, e_subtype, e_status }

local mip_dissector = Dissector.get("mip")

local function check_zero(item, range)
    if range:uint() ~= 0 then
        item:add_proto_expert_info(e_reserved)
    end
end

local function add_ident(tree, range)
    tree:add(f.ident, range)
    tree:add_packet_field(f.ident_time, range, ENC_TIME_NTP + ENC_BIG_ENDIAN)
end

local function dissect_vendor(tree, tvb, off, stop, vid_off)
    -- vid_off: offset of the Vendor-Id inside this extension
    local vid = tvb(vid_off, 4):uint()
    tree:add(f.vse_vendor, tvb(vid_off, 4))
    local vtype_item = tree:add(f.vse_type, tvb(vid_off + 4, 2))
    local vtype = tvb(vid_off + 4, 2):uint()
    local data_off = vid_off + 6
    local data_len = stop - data_off
    local label = ""
    if vid == VENDOR_ID and vendor_type_names[vtype] then
        label = vendor_type_names[vtype]
        vtype_item:append_text(" (" .. label .. ")")
    end
    if data_len > 0 then
        tree:add(f.vse_value, tvb(data_off, data_len))
        if vid == VENDOR_ID and vtype == 2 and data_len == 4 then
            tree:add(f.prev_fa, tvb(data_off, 4))
        end
    end
    return label
end

local function dissect_extensions(tvb, pinfo, tree, off)
    local len = tvb:len()
    while off < len do
        local t = tvb(off, 1):uint()
        local hdr, body_len
        if long_ext[t] then
            hdr = 4
            if off + hdr > len then
                tree:add_proto_expert_info(e_malformed, "truncated extension header")
                return
            end
            body_len = tvb(off + 2, 2):uint()
        else
            hdr = 2
            if off + hdr > len then
                tree:add_proto_expert_info(e_malformed, "truncated extension header")
                return
            end
            body_len = tvb(off + 1, 1):uint()
        end
        local stop = off + hdr + body_len
        if stop > len then
            tree:add_proto_expert_info(e_malformed, "extension runs past the end of the message")
            return
        end
        local name = ext_names[t] or (t >= 128 and "Unknown (skippable)" or "Unknown (non-skippable)")
        local sub = tree:add(proto, tvb(off, stop - off), "Extension: " .. name)
        sub:add(f.ext_type, tvb(off, 1))
        if long_ext[t] then
            sub:add(f.ext_subtype, tvb(off + 1, 1))
            sub:add(f.ext_len, tvb(off + 2, 2))
        else
            sub:add(f.ext_len, tvb(off + 1, 1))
        end
        local b = off + hdr  -- body
        if (t == 32 or t == 33 or t == 34 or t == 36) and body_len >= 4 then
            sub:add(f.spi, tvb(b, 4))
            if body_len > 4 then
                sub:add(f.authenticator, tvb(b + 4, body_len - 4))
            end
        elseif t == 131 and body_len > 0 then
            sub:add(f.nai, tvb(b, body_len))
            sub:append_text(": " .. tvb(b, body_len):string())
        elseif t == 132 and body_len > 0 then
            sub:add(f.challenge, tvb(b, body_len))
        elseif t == 38 and body_len >= 6 then
            local label = dissect_vendor(sub, tvb, off, stop, b)
            if label ~= "" then sub:append_text(": " .. label) end
        elseif t == 134 and body_len >= 8 then
            sub:add(f.vse_reserved, tvb(b, 2))
            local label = dissect_vendor(sub, tvb, off, stop, b + 2)
            if label ~= "" then sub:append_text(": " .. label) end
        elseif body_len > 0 then
            if t == 32 or t == 33 or t == 34 or t == 36 or t == 38 or t == 134 then
                sub:add_proto_expert_info(e_malformed, "extension too short")
            end
            sub:add(f.ext_data, tvb(b, body_len))
        end
        off = stop
    end
end

function proto.dissector(tvb, pinfo, tree)
    local len = tvb:len()
    if len < 8 or tvb(0, 1):uint() ~= MSG_EXPERIMENTAL or tvb(4, 4):uint() ~= VENDOR_ID then
        return mip_dissector:call(tvb, pinfo, tree)
    end
    local subtype = tvb(1, 1):uint()
    local name = subtype_names[subtype] or ("Unknown subtype " .. subtype)
    pinfo.cols.protocol = "MIPVPN"
    local root = tree:add(proto, tvb(), "mipvpn " .. name)
    root:add(f.msg, tvb(0, 2), name)
    root:add(f.type, tvb(0, 1)):append_text(" (Experimental Message, RFC 4064)")
    root:add(f.subtype, tvb(1, 1))
    check_zero(root:add(f.reserved, tvb(2, 2)), tvb(2, 2))
    root:add(f.vendor_id, tvb(4, 4)):append_text(" (RFC 5612 documentation)")

    local need = fixed_len[subtype]
    if need == nil then
        root:add_proto_expert_info(e_subtype)
        pinfo.cols.info = "mipvpn " .. name
        if len > 8 then root:add(f.ext_data, tvb(8, len - 8)) end
        return len
    end
    if subtype == 1 and len > 8 and tvb(8, 1):bitfield(1, 1) == 1 then  -- I flag
        need = need + 8
    end
    if len < need then
        root:add_proto_expert_info(e_malformed, name .. ": " .. len .. " bytes < " .. need)
        pinfo.cols.info = name .. " [malformed]"
        return len
    end

    local info = name
    local hoa = tostring(tvb(12, 4):ipv4())
    if subtype == 1 then
        local flags_item = root:add(f.flags, tvb(8, 1))
        flags_item:add(f.flag_a, tvb(8, 1))
        flags_item:add(f.flag_i, tvb(8, 1))
        flags_item:add(f.flag_m, tvb(8, 1))
        flags_item:add(f.flag_g, tvb(8, 1))
        local flag_r_item = flags_item:add(f.flag_r, tvb(8, 1))
        if tvb(8, 1):bitfield(4, 4) ~= 0 then flag_r_item:add_proto_expert_info(e_reserved) end
        check_zero(root:add(f.reserved8, tvb(9, 1)), tvb(9, 1))
        root:add(f.lifetime, tvb(10, 2))
        root:add(f.hoa, tvb(12, 4))
        root:add(f.coa, tvb(16, 4))
        if need == 28 then add_ident(root, tvb(20, 8)) end
        info = string.format("%s HoA=%s CoA=%s lifetime=%d", name, hoa, tostring(tvb(16, 4):ipv4()),
            tvb(10, 2):uint())
    elseif subtype == 2 then
        local status = tvb(8, 1):uint()
        local st_item = root:add(f.status, tvb(8, 1))
        if status ~= 0 then st_item:add_proto_expert_info(e_status) end
        check_zero(root:add(f.reserved8, tvb(9, 1)), tvb(9, 1))
        root:add(f.lifetime, tvb(10, 2))
        root:add(f.hoa, tvb(12, 4))
        add_ident(root, tvb(16, 8))
        info = string.format("%s HoA=%s status=%d (%s) lifetime=%d", name, hoa, status,
            status_names[status] or "unknown", tvb(10, 2):uint())
    elseif subtype == 3 then
        hoa = tostring(tvb(8, 4):ipv4())
        root:add(f.hoa, tvb(8, 4))
        add_ident(root, tvb(12, 8))
        info = string.format("%s HoA=%s", name, hoa)
    elseif subtype == 4 then
        hoa = tostring(tvb(8, 4):ipv4())
        root:add(f.hoa, tvb(8, 4))
        root:add(f.target, tvb(12, 4))
        info = string.format("%s HoA=%s target=%s", name, hoa, tostring(tvb(12, 4):ipv4()))
    end
    pinfo.cols.info = info
    dissect_extensions(tvb, pinfo, root, need)
    return len
end

DissectorTable.get("udp.port"):add(MIP_PORT, proto)
